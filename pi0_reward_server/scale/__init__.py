"""Scale-out on Ray (the ``ray`` extra): model servers as Ray actors, rollouts as Ray tasks.

Nothing here is imported unless Ray is used: the app imports :mod:`.ray_rollouts` only when
``execution = "ray"``, and :mod:`.ray_servers` is the launcher's (``python -m pi0_reward_server.scale``).
"""
