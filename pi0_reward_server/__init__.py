"""pi0_reward_server: the reward app (Flask), its client pool over model servers, and its tasks."""

__version__ = "0.1.0"
