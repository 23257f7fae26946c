"""Build, save and load medvl models: a stock `LlavaForConditionalGeneration` (vision encoder ->
2-layer GELU MLP projector -> causal LM) with its `LlavaProcessor`.

Two ways in: a preset from configs with random weights (`tiny`, for tests and the quickstart), or
pretrained parts (`vision=<hub id or folder>`, `llm=<hub id or folder>`). A saved model is a plain
Hugging Face folder (safetensors, config, tokenizer, processor with the chat template) that stock
transformers loads without medvl.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionModel,
    VivitImageProcessor,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from medvl.errors import InputError
from medvl.imaging import (
    DEFAULT_VOLUME_TOKENS,
    Preprocessing,
    VolumeSpec,
    default_volume_spec,
    read_scan,
    slab_count,
    volume_slabs,
)
from medvl.imaging.slabs import MAX_SCAN_BYTES, MAX_SCAN_VOXELS
from medvl.model.tokenizer import CHAT_TEMPLATE, IMAGE_TOKEN, add_medvl_tokens

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


class PresetSpec(BaseModel):
    """A model recipe. Either `vision`/`llm` name pretrained parts, or `vision_config`/`llm_config`
    describe randomly initialised ones (the tokenizer is then trained locally)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    vision: str | None = None
    llm: str | None = None
    vision_config: dict[str, Any] | None = None
    llm_config: dict[str, Any] | None = None
    tokenizer_vocab_size: int = 2048
    image_size: int | None = None
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    trust_remote_code: bool = False
    extra: dict[str, Any] = Field(default_factory=dict)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name_or_path: str) -> PresetSpec:
    path = Path(name_or_path)
    if name_or_path in list_presets():
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"unknown preset {name_or_path!r}; available: {', '.join(list_presets())}")
    return PresetSpec(**yaml.safe_load(path.read_text()))


def check_volume_specs(specs: tuple[VolumeSpec, ...] | list[VolumeSpec]) -> None:
    """A scan's modality picks its spec: at most one for CT (HU: windows or hu_range) and one for the
    other modalities."""
    kinds = [s.hu for s in specs]
    if len(set(kinds)) != len(kinds):
        raise ValueError("at most one CT spec (windows or hu_range) and one for other modalities (neither)")


class VolumePreprocessing(BaseModel):
    """How a scan becomes this model's slabs (the slices route, docs/3d.md): the spec its training
    volumes were curated with, per kind (CT; other modalities), the default spec for a kind it names
    none for, and the image tokens one volume may take, which set its number of slabs. Training saves
    it beside the weights (`volumes.json`); chat, the server and the web demo read scans with it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    volume_tokens: int = Field(DEFAULT_VOLUME_TOKENS, gt=0)
    specs: tuple[VolumeSpec, ...] = ()

    @field_validator("specs")
    @classmethod
    def _one_per_kind(cls, v: tuple[VolumeSpec, ...]) -> tuple[VolumeSpec, ...]:
        check_volume_specs(v)
        return v

    def spec_for(self, modality: str) -> VolumeSpec:
        return next((s for s in self.specs if s.hu == (modality == "CT")), default_volume_spec(modality))

    def check_budget(self, tokens_per_image: int) -> None:
        """ValueError when the budget pays for no image of `tokens_per_image` tokens."""
        slab_count(1, tokens_per_image, self.volume_tokens)

    def with_tokens(self, volume_tokens: int | None) -> VolumePreprocessing:
        """The same with another budget (None: this one), e.g. a server's `--volume-tokens`."""
        return self if volume_tokens is None else self.model_copy(update={"volume_tokens": volume_tokens})

    def slabs(
        self,
        source: str | Path | bytes,
        tokens_per_image: int,
        name: str | None = None,
        *,
        max_bytes: int = MAX_SCAN_BYTES,
        max_voxels: int = MAX_SCAN_VOXELS,
        frames: int | None = None,
    ) -> list[Image.Image]:
        """A scan (`medvl.imaging.read_scan`: a NIfTI file, a DICOM series as a folder or zip) -> its
        slabs: the spec for its modality through `VolumeSpec.apply`, then K = `slab_count` slabs, or
        `frames` slabs for a native-route model (`native_frames`), whatever the budget."""
        name = name or ("<bytes>" if isinstance(source, bytes) else str(source))
        img, modality = read_scan(source, name, max_bytes=max_bytes, max_voxels=max_voxels)
        array = self.spec_for(modality).apply(img, name=name).array
        k = frames or slab_count(array.shape[1], tokens_per_image, self.volume_tokens)
        return volume_slabs(array, k)


@dataclass
class VLM:
    """A model with its processor: everything needed to train, generate and save."""

    model: LlavaForConditionalGeneration
    processor: LlavaProcessor
    # How DICOM and other medical files become the pixels this model sees: set it to the preprocessing
    # of the curated data it is trained on; serving, chat and evaluation read files with it.
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    # How scans (NIfTI, DICOM series) become its slabs: the spec and token budget of its training volumes.
    volumes: VolumePreprocessing = field(default_factory=VolumePreprocessing)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def save(self, folder: str | Path) -> None:
        save(self.model, self.processor, folder)
        save_input_descriptions(self.preprocessing, self.volumes, folder)


# Vision towers whose patch embedding is a Conv3d over (frames, height, width): a model with one is on
# the `native` 3D route (docs/3d.md). Its input is a volume of `num_frames` slabs, [T, 3, H, W]; the
# `slices` route's towers (CLIP, SigLIP) see 2D images.
NATIVE_TOWERS = ("vivit",)


def native_frames(config: PretrainedConfig) -> int | None:
    """The slabs a native-route model sees per volume (its tower's `num_frames`); None for a 2D tower.
    `config`: the Llava config or its vision config."""
    vision = getattr(config, "vision_config", config)
    return vision.num_frames if vision.model_type in NATIVE_TOWERS else None


def tower_slabs(config: PretrainedConfig, slabs: list[Image.Image]) -> list:
    """A volume's slabs as its 3D tower's image processor takes them: RGB images, or for a one-channel
    tower (M3D's) grey [H, W, 1] arrays (the processor takes no 2D array; a slab of one slice shows that
    slice in every channel, so grey is the slice)."""
    vision = getattr(config, "vision_config", config)
    if vision.num_channels == 1:
        return [np.asarray(im.convert("L"))[..., None] for im in slabs]
    return [im.convert("RGB") for im in slabs]


def tower_patches(vision_config: PretrainedConfig) -> int:
    """Patch tokens the tower makes of one input: (H / p)^2, times T / t frames for a 3D tower."""
    if native_frames(vision_config):
        t, p, q = vision_config.tubelet_size
        return (
            (vision_config.num_frames // t)
            * (vision_config.image_size // p)
            * (vision_config.image_size // q)
        )
    return (vision_config.image_size // vision_config.patch_size) ** 2


def _has_cls(vision_config: PretrainedConfig) -> bool:
    # CLIP and ViViT prepend a CLS token; "default" drops it again. SigLIP has none.
    return vision_config.model_type.startswith("clip") or vision_config.model_type in NATIVE_TOWERS


def make_processor(
    image_processor, tokenizer, vision_config: PretrainedConfig, strategy: str
) -> LlavaProcessor:
    tokenizer.padding_side = "left"  # decoder-only batched generation pads on the left
    if native_frames(vision_config):
        # The processor counts (H / p)^2 + additional - (1 for "default") tokens per image; for a volume
        # tower the additional count makes that the tower's T/t * (H/p)^2. medvl's own `encode` expands
        # a volume's `<image>` itself (the processor's check counts frames as images).
        p = vision_config.tubelet_size[1]
        additional = tower_patches(vision_config) - (vision_config.image_size // p) ** 2 + 1
    else:
        p = vision_config.patch_size
        additional = 1 if _has_cls(vision_config) else 0
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=p,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=additional,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def _llava_config(vision_config, text_config, tokenizer, layer: int, strategy: str) -> LlavaConfig:
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=tower_patches(vision_config)
        + (1 if strategy == "full" and _has_cls(vision_config) else 0),
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
    )


def build_from_configs(spec: PresetSpec, tokenizer, seed: int = 0) -> VLM:
    """Random weights from config dicts: the `tiny` preset. `tokenizer` comes from
    :func:`medvl.model.tokenizer.train_tokenizer`."""
    if spec.vision_config is None or spec.llm_config is None:
        raise ValueError(f"preset {spec.name!r} names pretrained parts; use build_from_parts")
    torch.manual_seed(seed)
    vcfg = AutoConfig.for_model(**spec.vision_config)
    tcfg = AutoConfig.for_model(
        **spec.llm_config,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    config = _llava_config(
        vcfg, tcfg, tokenizer, spec.vision_feature_layer, spec.vision_feature_select_strategy
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = (volume_image_processor if native_frames(vcfg) else square_image_processor)(
        vcfg.image_size
    )
    processor = make_processor(image_processor, tokenizer, vcfg, spec.vision_feature_select_strategy)
    _set_generation_defaults(model, tokenizer)
    return VLM(model.eval(), processor)


def square_image_processor(size: int) -> CLIPImageProcessorPil:
    """The image processor of every medvl model: resize to a `size` square, no centre crop (medical
    images keep their whole field of view), CLIP's normalisation."""
    return CLIPImageProcessorPil(
        size={"height": size, "width": size}, do_center_crop=False, crop_size={"height": size, "width": size}
    )


def volume_image_processor(
    size: int, image_mean: list[float] | None = None, image_std: list[float] | None = None
) -> VivitImageProcessor:
    """The native route's processor (transformers' ViViT one, so stock `AutoImageProcessor` loads it):
    each of a volume's slabs as `square_image_processor` treats an image (a `size` square, no crop,
    CLIP's normalisation unless another mean and std are given), stacked into [T, C, H, W]."""
    clip = square_image_processor(size)
    return VivitImageProcessor(
        size={"height": size, "width": size},
        do_center_crop=False,
        crop_size={"height": size, "width": size},
        rescale_factor=1 / 255,
        offset=False,
        image_mean=clip.image_mean if image_mean is None else image_mean,
        image_std=clip.image_std if image_std is None else image_std,
        resample=clip.resample,
    )


_VISION_CLASSES = {
    "clip": CLIPVisionModel,
    "clip_vision_model": CLIPVisionModel,
    "siglip": SiglipVisionModel,
    "siglip_vision_model": SiglipVisionModel,
}


def load_vision_tower(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedModel:
    """A vision encoder from a hub id or folder. Full CLIP/SigLIP checkpoints (text + vision) give
    their vision half; any other transformers vision model loads through AutoModel."""
    cfg = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    cls = _VISION_CLASSES.get(cfg.model_type)
    if cls is not None:
        return cls.from_pretrained(name_or_path)
    return AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def build_from_parts(
    vision: str,
    llm: str,
    *,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    image_size: int | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
) -> VLM:
    """Assemble a model from a pretrained vision encoder and a pretrained causal LM (hub ids or
    folders): their weights go into the sub-modules, the projector starts random, the tokenizer gains
    `<image>` and the ChatML markers, and the embeddings are resized to match."""
    vision_model = load_vision_tower(vision, trust_remote_code)
    if image_size is not None and image_size != vision_model.config.image_size:
        raise ValueError(
            f"vision tower {vision!r} is trained at {vision_model.config.image_size}px, preset asks for "
            f"{image_size}px; position-embedding interpolation is a training option, not a build option"
        )
    llm_model = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(llm, trust_remote_code=trust_remote_code)
    add_medvl_tokens(tokenizer)
    vcfg = vision_model.config
    config = _llava_config(
        vcfg, llm_model.config, tokenizer, vision_feature_layer, vision_feature_select_strategy
    )
    # Build the shell on the meta device and move the loaded parts in, so a 7B model is never held
    # twice in memory.
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision_model.to(dtype)
    model.model.language_model = llm_model.model
    model.lm_head = llm_model.lm_head
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(dtype)
    model.config.text_config = llm_model.config
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    try:
        image_processor = AutoImageProcessor.from_pretrained(vision)
    except OSError:
        image_processor = square_image_processor(vcfg.image_size)
    processor = make_processor(image_processor, tokenizer, vcfg, vision_feature_select_strategy)
    _set_generation_defaults(model, tokenizer)
    return VLM(model.eval(), processor)


def build_preset(name: str, tokenizer=None, seed: int = 0) -> VLM:
    spec = load_preset(name)
    if spec.vision and spec.llm:
        return build_from_parts(
            spec.vision,
            spec.llm,
            vision_feature_layer=spec.vision_feature_layer,
            vision_feature_select_strategy=spec.vision_feature_select_strategy,
            image_size=spec.image_size,
            trust_remote_code=spec.trust_remote_code,
        )
    if tokenizer is None:
        raise ValueError(f"preset {name!r} trains its tokenizer locally: pass one (see train_tokenizer)")
    return build_from_configs(spec, tokenizer, seed=seed)


def _set_generation_defaults(model: PreTrainedModel, tokenizer) -> None:
    gc = model.generation_config
    gc.eos_token_id = tokenizer.eos_token_id
    gc.pad_token_id = tokenizer.pad_token_id
    gc.bos_token_id = None
    gc.do_sample = False


def save(model: PreTrainedModel, processor: LlavaProcessor, folder: str | Path) -> None:
    """Plain Hugging Face folder, weights as safetensors only."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


# Next to the weights: stock transformers ignores them, medvl's `load` reads them.
PREPROCESSING_FILE = "preprocessing.json"
VOLUMES_FILE = "volumes.json"


def save_preprocessing(preprocessing: Preprocessing, folder: str | Path) -> None:
    path = Path(folder) / PREPROCESSING_FILE
    path.write_text(preprocessing.model_dump_json(indent=1) + "\n")


def save_input_descriptions(
    preprocessing: Preprocessing, volumes: VolumePreprocessing, folder: str | Path
) -> None:
    """What a model folder says about its inputs: how files become pixels, and scans slabs."""
    save_preprocessing(preprocessing, folder)
    (Path(folder) / VOLUMES_FILE).write_text(volumes.model_dump_json(indent=1) + "\n")


def load_preprocessing(folder: str | Path) -> Preprocessing:
    """A model folder's preprocessing (or a preprocessing JSON file itself); medvl's default for a
    folder without one (e.g. a stock LLaVA model)."""
    path = Path(folder)
    if path.suffix == ".json":
        if not path.is_file():
            raise InputError(str(path), "preprocessing", "file not found")
    else:
        path = path / PREPROCESSING_FILE
    return _read_description(path, Preprocessing, "preprocessing")


def load_volumes(folder: str | Path) -> VolumePreprocessing:
    """A model folder's volume preprocessing; the default specs and budget for a folder without one."""
    return _read_description(Path(folder) / VOLUMES_FILE, VolumePreprocessing, "volumes")


def _read_description(path: Path, kind: type[BaseModel], what: str):
    if not path.exists():
        return kind()
    try:
        return kind.model_validate_json(path.read_text())
    except ValidationError as e:  # invalid JSON included
        problem = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'file'}: {x['msg']}" for x in e.errors())
        raise InputError(str(path), what, problem) from None


def load(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None) -> VLM:
    """Load a medvl (= stock LLaVA) folder. safetensors only, no remote code."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: not a model folder (config.json missing)")
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise ValueError(
            f"{folder}: pickle weight files (.bin/.pt) are refused; medvl loads safetensors only"
        )
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    if device:
        model.to(device)
    return VLM(model.eval(), processor, load_preprocessing(folder), load_volumes(folder))
