"""Build a LeRobot SmolVLA checkpoint with random weights, offline, for tests and benchmarks.

    python scripts/make_tiny_smolvla.py OUT_DIR [--size tiny|full] [--seed 0]

OUT_DIR becomes an ordinary LeRobot checkpoint directory (``config.json``,
``model.safetensors``, ``policy_preprocessor.json``,
``policy_postprocessor.json`` and their state files) plus ``vlm/``: the
VLM's config and a tokenizer, which SmolVLA reads at load time. Everything is
made here from unmodified LeRobot and transformers code (nothing comes from a
hub): the tokenizer is a byte-level BPE trained on a few LIBERO instructions.

``tiny`` (default) is about 0.1 M parameters and answers a batch of 8 in tens
of milliseconds on a CPU. ``full`` has SmolVLA's real shapes (SmolVLM2-500M's
text and vision towers cut to 16 layers, the action expert; a 2000-token
vocabulary instead of 49k, so 356 M parameters) with random weights: for GPU
benchmarks, not for CI (3 s per sample on 2 CPU cores).

Inputs are openpi's LIBERO features as LeRobot names them
(``observation.images.image``, ``observation.images.wrist_image``,
``observation.state`` of 8), actions 7-dimensional in chunks of 10 (tiny) or
50 (full), normalisation stats made up (state and action mean/std).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from gpu_worker.models.lerobot import import_lerobot  # noqa: E402

STATE_DIM, ACTION_DIM = 8, 7
SPECIAL = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
           "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
CORPUS = ["pick up the black bowl between the plate and the ramekin and place it on the plate",
          "put both the alphabet soup and the tomato sauce in the basket",
          "open the top drawer and put the bowl inside", "turn on the stove and put the moka pot on it",
          "put the cream cheese in the bowl"] * 4
SIZES = {
    # name: (VLM image size, patch, vision dims/layers/heads, text dims/layers/heads/kv heads, chunk, vocab)
    "tiny": dict(image=32, patch=8, vision=(32, 64, 1, 2), text=(32, 64, 2, 4, 2), chunk=10, vocab=400, vlm_layers=2),
    "full": dict(image=512, patch=16, vision=(768, 3072, 12, 12), text=(960, 2560, 32, 15, 5), chunk=50, vocab=2000,
                 vlm_layers=16),
}


def make_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())  # byte level: any text encodes, never an unknown token
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", *SPECIAL.values()],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=2048, extra_special_tokens=SPECIAL)


def make_vlm(folder: pathlib.Path, size: dict) -> None:
    """What SmolVLA reads from ``vlm_model_name``: AutoConfig, AutoProcessor, AutoTokenizer."""
    from transformers import SmolVLMConfig
    from transformers.models.smolvlm import SmolVLMImageProcessor, SmolVLMProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    tokenizer = make_tokenizer(size["vocab"])
    v_hidden, v_mlp, v_layers, v_heads = size["vision"]
    t_hidden, t_mlp, t_layers, t_heads, t_kv = size["text"]
    SmolVLMConfig(
        vision_config=dict(hidden_size=v_hidden, intermediate_size=v_mlp, num_hidden_layers=v_layers,
                           num_attention_heads=v_heads, image_size=size["image"], patch_size=size["patch"]),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=t_hidden, intermediate_size=t_mlp,
                         num_hidden_layers=t_layers, num_attention_heads=t_heads, num_key_value_heads=t_kv,
                         head_dim=t_hidden // t_heads, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id),
        scale_factor=2 if size["image"] // size["patch"] <= 8 else 4,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
    ).save_pretrained(folder)
    edge = {"longest_edge": size["image"]}
    tokens_per_image = (size["image"] // size["patch"]) ** 2 // (4 if size["image"] // size["patch"] <= 8 else 16)
    SmolVLMProcessor(image_processor=SmolVLMImageProcessor(size=edge, max_image_size=edge),
                     video_processor=SmolVLMVideoProcessor(size=edge, max_image_size=edge),
                     tokenizer=tokenizer, image_seq_len=tokens_per_image).save_pretrained(folder)


def build(out: pathlib.Path, size_name: str = "tiny", seed: int = 0) -> pathlib.Path:
    import_lerobot()
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    size = SIZES[size_name]
    out = out.resolve()
    make_vlm(out / "vlm", size)
    image = (3, 64, 64) if size_name == "tiny" else (3, 256, 256)
    cfg = SmolVLAConfig(
        device="cpu", push_to_hub=False, vlm_model_name=str(out / "vlm"), load_vlm_weights=False,
        input_features={
            "observation.images.image": PolicyFeature(type=FeatureType.VISUAL, shape=image),
            "observation.images.wrist_image": PolicyFeature(type=FeatureType.VISUAL, shape=image),
            "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,)),
        },
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
        chunk_size=size["chunk"], n_action_steps=size["chunk"], num_steps=10,
        resize_imgs_with_padding=(size["image"], size["image"]), num_vlm_layers=size["vlm_layers"],
    )
    torch.manual_seed(seed)
    policy = SmolVLAPolicy(cfg)
    policy.save_pretrained(out)
    generator = torch.Generator().manual_seed(seed + 1)
    stats = {key: {"mean": torch.randn(dim, generator=generator) * 0.1,
                   "std": torch.rand(dim, generator=generator) + 0.5}
             for key, dim in (("observation.state", STATE_DIM), ("action", ACTION_DIM))}
    preprocessor, postprocessor = make_pre_post_processors(cfg, dataset_stats=stats)
    preprocessor.save_pretrained(out)
    postprocessor.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = build(args.out, args.size, args.seed)
    print(f"wrote a {args.size} SmolVLA checkpoint with random weights to {out}")


if __name__ == "__main__":
    main()
