"""LeRobot policies (SmolVLA; PI0 / PI0.5 with LeRobot 0.5+) hosted by gpu_worker, batched.

A checkpoint directory as LeRobot saves it (``config.json``,
``model.safetensors``, ``policy_preprocessor.json``,
``policy_postprocessor.json`` and their state files) is loaded through
LeRobot's public API only::

    cfg = PreTrainedConfig.from_pretrained(dir)
    policy = get_policy_class(cfg.type).from_pretrained(dir, config=cfg)
    pre, post = make_pre_post_processors(cfg, pretrained_path=dir)

Requests use openpi's LIBERO observation (``observation/image`` and
``observation/wrist_image`` uint8 HxWx3, ``observation/state``, ``prompt``),
mapped to the policy's input features by ``key_map``; a whole dynamic batch
runs as one ``predict_action_chunk``, and each row gets ``actions``
``[chunk, action_dim]``.

Noise: flow-matching policies start from Gaussian noise. Each row's noise is
drawn from a generator seeded by ``seed`` and a hash of that row's
observation, so a fixed seed is reproducible, and a row gets the same actions
whether it runs alone or in a batch of any size (up to float rounding, about
1e-6). Change ``seed`` to draw other samples.

Nothing is downloaded, ever: ``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE``
are set before LeRobot loads. SmolVLA reads its VLM's config and tokenizer
from ``vlm_model_name`` (the weights come from the checkpoint): point
``vlm_path`` at a local copy, or keep one in ``<checkpoint>/vlm``; a missing
file is named in the error with where to put it.

Options (a config file's ``options = {...}``): ``key_map`` (openpi key ->
LeRobot feature, or ``"task"`` for the prompt), ``image_size`` ([H, W] of the
images clients send; 224x224 as openpi's LIBERO example), ``dtype``
("float32" or "bfloat16"), ``num_steps`` (denoising steps), ``vlm_path``,
``tokenizer_path`` (default: the VLM folder), ``seed``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import pathlib
import sys
from typing import Any, Mapping

import numpy as np

from gpu_worker.model import STRING, ModelLoadError, TensorSpec

DEFAULT_KEY_MAP = {
    "observation/image": "observation.images.image",
    "observation/wrist_image": "observation.images.wrist_image",
    "observation/state": "observation.state",
    "prompt": "task",
}
TASK = "task"
REQUIRED_FILES = ("config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json")
_TORCHVISION_SCHEMAS = None


def _make_torchvision_importable() -> None:
    """Let PyPI's torchvision import beside a CPU-only torch.

    PyPI's Linux torchvision wheels are built against CUDA: beside the CPU torch
    their ``_C`` extension fails to load (quietly), and then
    ``torchvision/_meta_registrations.py`` registers fake kernels for
    ``torchvision::nms`` and ``qnms`` unconditionally and raises "operator
    torchvision::nms does not exist". LeRobot imports torchvision on every
    path (its dataset utilities), but its VLA policies never call its C++
    operators. Defining those two operator schemas first lets the import
    succeed; the operators themselves stay unavailable and say so if called.
    Where the extension loads (a CPU build, or CUDA torch), nothing is changed.
    """
    global _TORCHVISION_SCHEMAS
    if _TORCHVISION_SCHEMAS is not None or "torchvision" in sys.modules:
        return
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    for library in pathlib.Path(list(spec.submodule_search_locations)[0]).glob("_C*.so"):
        try:
            torch.ops.load_library(str(library))
            return  # the extension matches this torch
        except (OSError, RuntimeError):
            pass
    _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "DEF")
    _TORCHVISION_SCHEMAS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SCHEMAS.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def import_lerobot():
    """Import lerobot offline (no hub access from here on), or say how to install it."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    _make_torchvision_importable()
    try:
        import lerobot
        from lerobot.configs.policies import PreTrainedConfig  # noqa: F401 - the API used below must exist
        from lerobot.policies.factory import get_policy_class, make_pre_post_processors  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(f"LeRobot is not installed or incomplete ({exc}): run bash scripts/install_lerobot.sh") from exc
    return lerobot


def _row_seed(seed: int, row: Mapping[str, Any]) -> int:
    digest = hashlib.blake2b(int(seed).to_bytes(8, "little", signed=True), digest_size=8)
    for key in sorted(row):
        value = np.ascontiguousarray(row[key])
        digest.update(key.encode())
        digest.update(value.dtype.str.encode() + str(value.shape).encode())
        digest.update(str(value).encode() if value.dtype.kind == "U" else value.tobytes())
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


class LeRobotPolicy:
    """A LeRobot policy behind gpu_worker's model interface (see the module's notes)."""

    def __init__(self, checkpoint: pathlib.Path, cfg, policy, preprocessor, postprocessor, *, key_map: dict[str, str],
                 image_size: tuple[int, int], autocast: bool, device: str, seed: int) -> None:
        import torch

        self.checkpoint, self.cfg, self.policy = checkpoint, cfg, policy
        self.preprocessor, self.postprocessor = preprocessor, postprocessor
        self.key_map, self.autocast, self.device, self.seed = key_map, autocast, device, seed
        features = cfg.input_features
        self.input_spec: dict[str, TensorSpec] = {}
        self._visual: set[str] = set()
        for key, feature in key_map.items():
            if feature == TASK:
                self.input_spec[key] = TensorSpec((), STRING)
            elif features[feature].type.name == "VISUAL":
                self.input_spec[key] = TensorSpec((*image_size, 3), "uint8")
                self._visual.add(key)
            else:
                self.input_spec[key] = TensorSpec(tuple(features[feature].shape), "float32")
        self.action_dim = int(cfg.output_features["action"].shape[0])
        self.chunk = int(cfg.chunk_size)
        self.output_spec = {"actions": TensorSpec((self.chunk, self.action_dim), "float32")}
        weights = (checkpoint / "model.safetensors").stat()  # size and time, not a read of gigabytes
        options = json.dumps({"key_map": key_map, "seed": seed, "autocast": autocast,
                              "num_steps": getattr(cfg, "num_steps", getattr(cfg, "num_inference_steps", None))},
                             sort_keys=True)  # what else changes the actions: another version too
        digest = hashlib.sha256((checkpoint / "config.json").read_bytes() + options.encode()
                                + f"{weights.st_size}:{weights.st_mtime_ns}".encode()).hexdigest()[:12]
        self.version = f"{cfg.type}:{checkpoint.name}@{digest}"
        accepts = inspect.signature(policy.predict_action_chunk).parameters
        model = getattr(policy, "model", None)
        if "noise" in accepts:
            self._noise_route = "argument"
        elif callable(getattr(model, "sample_noise", None)):
            self._noise_route = "sample_noise"  # PI0 / PI0.5 draw it through model.sample_noise(shape, device)
        else:
            self._noise_route = None
        self._torch = torch

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | None,
        *,
        device: str,
        key_map: Mapping[str, str] | None = None,
        image_size: tuple[int, int] | list[int] = (224, 224),
        dtype: str = "float32",
        num_steps: int | None = None,
        vlm_path: str | None = None,
        tokenizer_path: str | None = None,
        seed: int = 0,
    ) -> "LeRobotPolicy":
        if not checkpoint:
            raise ModelLoadError("LeRobotPolicy needs a checkpoint directory: --model NAME=gpu_worker.models.lerobot:"
                                 "LeRobotPolicy@/path/to/checkpoint (a folder LeRobot's save_pretrained wrote)")
        root = pathlib.Path(checkpoint).resolve()
        if not root.is_dir():
            raise ModelLoadError(f"LeRobot checkpoint {str(root)!r} is not a directory")
        missing = [name for name in REQUIRED_FILES if not (root / name).is_file()]
        if missing:
            raise ModelLoadError(f"LeRobot checkpoint {str(root)!r} lacks {missing}: copy the whole checkpoint "
                                 "folder (policy.save_pretrained and the processors' save_pretrained write them)")
        if dtype not in ("float32", "bfloat16"):
            raise ModelLoadError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        if not (isinstance(image_size, (list, tuple)) and len(image_size) == 2
                and all(isinstance(v, int) and 8 <= v <= 4096 for v in image_size)):
            raise ModelLoadError(f"image_size must be [height, width] in pixels, got {image_size!r}")
        if num_steps is not None and not (isinstance(num_steps, int) and 1 <= num_steps <= 1000):
            raise ModelLoadError(f"num_steps must be an integer between 1 and 1000, got {num_steps!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ModelLoadError(f"seed must be an integer, got {seed!r}")
        import_lerobot()
        import torch
        from lerobot.configs.policies import PreTrainedConfig
        from lerobot.policies.factory import get_policy_class, make_pre_post_processors

        cfg = PreTrainedConfig.from_pretrained(root)
        cfg.device = device
        if num_steps is not None:
            names = [n for n in ("num_steps", "num_inference_steps") if hasattr(cfg, n)]
            if not names:
                raise ModelLoadError(f"policy type {cfg.type!r} has no denoising-step setting; drop num_steps")
            setattr(cfg, names[0], num_steps)
        if dtype == "bfloat16" and hasattr(cfg, "dtype"):
            cfg.dtype = dtype  # PI0 / PI0.5 cast their own parts; others are cast below
        vlm = _local_vlm(cfg, root, vlm_path)
        if vlm is not None:
            cfg.vlm_model_name = str(vlm)
        key_map = dict(DEFAULT_KEY_MAP if key_map is None else key_map)
        _check_key_map(key_map, cfg)
        try:
            policy = get_policy_class(cfg.type).from_pretrained(root, config=cfg)
        except OSError as exc:
            raise ModelLoadError(f"cannot load the LeRobot policy in {str(root)!r} offline: {exc}") from exc
        policy.eval()
        # bfloat16: PI0 / PI0.5 cast their own parts (cfg.dtype); others run under autocast, since a blanket
        # .to(bfloat16) breaks the float32 parts SmolVLA keeps.
        autocast = dtype == "bfloat16" and not hasattr(cfg, "dtype")
        pre_overrides = _step_overrides(root / "policy_preprocessor.json", {
            "device_processor": {"device": device},
            "tokenizer_processor": {"tokenizer_name": str(tokenizer_path or vlm)} if (tokenizer_path or vlm) else None,
        })
        try:
            preprocessor, postprocessor = make_pre_post_processors(
                cfg, pretrained_path=str(root), preprocessor_overrides=pre_overrides)
        except OSError as exc:
            raise ModelLoadError(f"cannot load the processors of {str(root)!r} offline: {exc}") from exc
        return cls(root, cfg, policy, preprocessor, postprocessor, key_map=key_map, image_size=tuple(image_size),
                   autocast=autocast, device=device, seed=seed)

    def metadata(self) -> dict[str, Any]:
        return {
            "policy_type": self.cfg.type, "checkpoint": self.checkpoint.name, "action_horizon": self.chunk,
            "action_dim": self.action_dim, "key_map": self.key_map, "seed": self.seed,
            "num_steps": getattr(self.cfg, "num_steps", getattr(self.cfg, "num_inference_steps", None)),
            "seeded_noise": self._noise_route is not None, "bfloat16_autocast": self.autocast,
        }

    def _noise(self, batch: Mapping[str, np.ndarray], rows: int):
        torch = self._torch
        shape = (int(self.cfg.chunk_size), int(getattr(self.cfg, "max_action_dim", self.action_dim)))
        noise = []
        for i in range(rows):
            generator = torch.Generator().manual_seed(_row_seed(self.seed, {k: v[i] for k, v in batch.items()}))
            noise.append(torch.randn(shape, generator=generator))
        return torch.stack(noise).to(self.device)

    def _lerobot_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        torch = self._torch
        out: dict[str, Any] = {}
        for key, feature in self.key_map.items():
            value = batch[key]
            if feature == TASK:
                out[TASK] = [str(text) for text in value]
            elif key in self._visual:  # uint8 BxHxWx3 -> float Bx3xHxW in [0, 1], as LeRobot's env wrappers give
                out[feature] = torch.from_numpy(np.array(value)).permute(0, 3, 1, 2).float().div_(255.0)
            else:  # np.array copies: decoded frames are read-only views, which torch refuses to wrap
                out[feature] = torch.from_numpy(np.array(value, dtype=np.float32))
        return out

    def infer_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        rows = len(next(iter(batch.values())))
        device_type = self.device.split(":")[0]
        with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.autocast):
            processed = self.preprocessor(self._lerobot_batch(batch))
            if self._noise_route == "argument":
                actions = self.policy.predict_action_chunk(processed, noise=self._noise(batch, rows))
            elif self._noise_route == "sample_noise":
                actions = self._with_model_noise(processed, self._noise(batch, rows))
            else:
                actions = self.policy.predict_action_chunk(processed)
            actions = self.postprocessor(actions)
        actions = actions.float().cpu().numpy()
        if actions.shape != (rows, self.chunk, self.action_dim):
            raise RuntimeError(f"the policy returned actions of shape {actions.shape}; expected "
                               f"{(rows, self.chunk, self.action_dim)}")
        return {"actions": actions}

    def _with_model_noise(self, processed, noise):
        model = self.policy.model
        original = model.sample_noise

        def seeded(shape, device):
            if tuple(shape) != tuple(noise.shape):
                raise RuntimeError(f"the policy asked for noise of shape {tuple(shape)}, not {tuple(noise.shape)}")
            return noise.to(device)

        model.sample_noise = seeded  # one owner thread per model: nothing else calls it meanwhile
        try:
            return self.policy.predict_action_chunk(processed)
        finally:
            model.sample_noise = original


def _local_vlm(cfg, root: pathlib.Path, vlm_path: str | None) -> pathlib.Path | None:
    """The local folder SmolVLA-style configs read their VLM's config and tokenizer from, or None if unused."""
    name = getattr(cfg, "vlm_model_name", None)
    if name is None:
        if vlm_path:
            raise ModelLoadError(f"policy type {cfg.type!r} has no VLM to point vlm_path at")
        return None
    candidates = [pathlib.Path(vlm_path)] if vlm_path else [pathlib.Path(name), root / "vlm"]
    for folder in candidates:
        if folder.is_dir():
            missing = [f for f in ("config.json", "tokenizer_config.json") if not (folder / f).is_file()]
            if missing:
                raise ModelLoadError(f"VLM folder {str(folder)!r} lacks {missing}: it must hold the VLM's config "
                                     "and tokenizer files as the hub repository has them")
            return folder.resolve()
    where = f"vlm_path={vlm_path!r} does not exist" if vlm_path else (
        f"neither {name!r} nor {str(root / 'vlm')!r} is a local folder")
    raise ModelLoadError(
        f"the checkpoint's config names the VLM {name!r}, whose config.json and tokenizer files are read at load "
        f"time (the weights come from the checkpoint), and {where}. Nothing is downloaded at run time: fetch it "
        f"once where the hub is reachable (huggingface-cli download {name} --local-dir DIR, weights not needed: "
        f"--include '*.json' '*.txt' '*.model'), copy DIR to {str(root / 'vlm')!r} or pass options vlm_path=DIR")


def _check_key_map(key_map: dict[str, str], cfg) -> None:
    if not key_map or not all(isinstance(k, str) and isinstance(v, str) for k, v in key_map.items()):
        raise ModelLoadError(f"key_map must map request keys to LeRobot feature names, got {key_map!r}")
    features = cfg.input_features
    unknown = sorted(v for v in key_map.values() if v != TASK and v not in features)
    if unknown:
        raise ModelLoadError(f"key_map names {unknown}, which are not inputs of this policy; its inputs are "
                             f"{sorted(features)} (and 'task' for the prompt)")
    needed = sorted(f for f, feature in features.items() if feature.type.name in ("VISUAL", "STATE")
                    and f not in key_map.values())
    if needed:
        raise ModelLoadError(f"the policy needs {needed}, which no key_map entry feeds: add entries "
                             f"'<request key>' = '<feature>' (key_map now: {key_map})")


def _step_overrides(pipeline_json: pathlib.Path, wanted: dict[str, dict | None]) -> dict[str, dict]:
    """Overrides for the steps this saved pipeline has (LeRobot refuses overrides for steps it lacks)."""
    try:
        steps = {step.get("registry_name") for step in json.loads(pipeline_json.read_text())["steps"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{str(pipeline_json)!r} is not a LeRobot processor file: {exc}") from exc
    return {name: values for name, values in wanted.items() if values and name in steps}
