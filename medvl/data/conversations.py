"""LLaVA-style conversation data -> token ids, loss labels and pixel values.

The input format is the one the ecosystem already uses (LLaVA, XTuner, ShareGPT4V):
`{"id", "image": path | [paths] (optional), "conversations": [{"from": "human"|"gpt"|"system",
"value": "...<image>..."}]}` in a JSON list or JSONL file. The prompt is rendered by the model's own
chat template, so training sees exactly what inference builds; the loss covers assistant tokens only
(the template's `{% generation %}` span, which includes the end-of-turn token).

A sample may name a stored volume instead of images: `"volume": "volumes/<sha256>.npy"` (a curated
volume record's `volume.file`, a uint8 [C, S, P, L] array, relative to the image root). It becomes a
multi-image sample of the `slices` route (docs/3d.md): K slabs (`medvl.imaging.volume_slabs`), K set by
the dataset's token budget per volume and the model's image tokens per image; its one `<image>`
placeholder becomes K, one per line, the text the chat template renders for K image parts at inference.

A model with a 3D tower (the `native` route, `medvl.model.build.native_frames`) sees a volume as one
input of T slabs, [T, 3, H, W], behind one `<image>`; its 2D images are still volumes (the image as all T
slabs), so 2D and 3D samples share its batches.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medvl.imaging import DEFAULT_VOLUME_TOKENS, read_image, slab_count, volume_slabs
from medvl.model.build import VLM, native_frames, tower_slabs
from medvl.prompts import IMAGE_TOKEN
from medvl.records import read_rows

# a micro-batch without images gets this sample (see `Collator.filler`)
FILLER_ID = "<vision filler>"
IGNORE = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Sample:
    id: str
    input_ids: list[int]  # image tokens already expanded
    labels: list[int]
    images: list[Path]
    image_size: int | None = None  # input size of the images (None: the vision tower's own)
    volume: Path | None = None  # a stored volume, fed as `slabs` images in place of `images`
    slabs: int = 0
    frames: int = 0  # native route: every input (image or volume) is one volume of this many slabs

    @property
    def n_images(self) -> int:
        """Inputs of the vision tower: images (2D) or volumes (native route)."""
        if self.frames:
            return len(self.images) + (self.volume is not None)
        return len(self.images) + self.slabs


# A sample with what its vision tower reads: PIL images, or (native route) one list of T slabs per input.
Item = tuple[Sample, list]


def image_tokens_at(config, size: int | None) -> int:
    """Image tokens per image when images are fed at `size` px (position embeddings interpolated)."""
    vision = config.vision_config
    if size is None or size == vision.image_size:
        return config.image_seq_length
    if native_frames(config):
        raise ValueError("a 3D (native) tower reads its inputs at its own size: no image_size schedule")
    if size % vision.patch_size:
        raise ValueError(f"image size {size} is not a multiple of the patch size {vision.patch_size}")
    return (
        config.image_seq_length
        - (vision.image_size // vision.patch_size) ** 2
        + (size // vision.patch_size) ** 2
    )


def resize_image_tokens(sample: Sample, image_id: int, n_old: int, n_new: int, size: int | None) -> Sample:
    """The same sample with each image's run of `n_old` image tokens replaced by `n_new`."""
    if n_old == n_new:
        return replace(sample, image_size=size)
    ids: list[int] = []
    labels: list[int] = []
    run = 0
    for tok, lab in zip(sample.input_ids + [None], sample.labels + [None], strict=True):
        if tok == image_id:
            run += 1
            continue
        if run:  # adjacent images form one run of a multiple of n_old tokens
            ids.extend([image_id] * (run // n_old * n_new))
            labels.extend([IGNORE] * (run // n_old * n_new))
            run = 0
        if tok is not None:
            ids.append(tok)
            labels.append(lab)
    return replace(sample, input_ids=ids, labels=labels, image_size=size)


def to_messages(record: dict, where: str) -> list[dict]:
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise ValueError(f"{where}: field 'conversations' must be a non-empty list")
    messages = []
    for j, turn in enumerate(convs):
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise ValueError(
                f"{where}: conversations[{j}] needs 'from' (human/gpt/system) and a string 'value'"
            )
        messages.append({"role": role, "content": turn["value"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no 'gpt' turn, nothing to learn from")
    return messages


def tokenize(
    vlm: VLM,
    record: dict,
    image_root: Path,
    max_length: int,
    where: str,
    volume_tokens: int = DEFAULT_VOLUME_TOKENS,
) -> Sample:
    """One record -> a Sample. Raises ValueError naming `where` (file and sample id) on bad input.
    `volume_tokens`: the image tokens a `volume` sample's slabs may take (module docstring)."""
    sid = str(record.get("id", "?"))
    where = f"{where} (sample id {sid})"
    images = record.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    volume = record.get("volume")
    if volume is not None and (images or not isinstance(volume, str)):
        raise ValueError(f"{where}: 'volume' must be one file path, in a sample without 'image'")
    messages = to_messages(record, where)
    n_placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    n_wanted = 1 if volume is not None else len(images)
    if n_placeholders == 0 and n_wanted:
        # LLaVA convention: an image sample without a placeholder gets it before the first question.
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = f"{IMAGE_TOKEN}\n" + first_user["content"]
        n_placeholders = 1 if n_wanted == 1 else 0
    if n_placeholders != n_wanted:
        what = "volume" if volume is not None else "images"
        raise ValueError(f"{where}: {n_placeholders} '<image>' placeholders but {n_wanted} {what}")
    paths = [image_root / p for p in images]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{where}: image file not found: {p}")
    volume_path, slabs = None, 0
    frames = native_frames(vlm.model.config) or 0
    if volume is not None:
        volume_path = image_root / volume
        if not volume_path.is_file():
            raise FileNotFoundError(f"{where}: volume file not found: {volume_path}")
        try:
            shape = np.load(volume_path, mmap_mode="r", allow_pickle=False).shape  # the header only
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}: volume {volume_path} is unreadable ({e})") from None
        if len(shape) != 4:
            raise ValueError(f"{where}: volume {volume_path} is {list(shape)}, expected [C, S, P, L]")
        if frames:  # one input of the 3D tower behind the one placeholder
            slabs = frames
        else:
            slabs = slab_count(shape[1], vlm.model.config.image_seq_length, volume_tokens)
            turn = next(m for m in messages if IMAGE_TOKEN in m["content"])
            turn["content"] = turn["content"].replace(IMAGE_TOKEN, "\n".join([IMAGE_TOKEN] * slabs), 1)

    enc = vlm.tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    image_id = vlm.model.config.image_token_id
    n_img = vlm.model.config.image_seq_length
    ids: list[int] = []
    labels: list[int] = []
    for tok, is_answer in zip(enc["input_ids"], enc["assistant_masks"], strict=True):
        if tok == image_id:
            ids.extend([image_id] * n_img)
            labels.extend([IGNORE] * n_img)
        else:
            ids.append(tok)
            labels.append(tok if is_answer else IGNORE)
    if len(ids) > max_length:
        raise ValueError(f"{where}: {len(ids)} tokens (with image tokens) exceed max_length={max_length}")
    return Sample(sid, ids, labels, paths, volume=volume_path, slabs=slabs, frames=frames)


class ConversationDataset(torch.utils.data.Dataset):
    """Tokenized up front (lengths are needed for batching); images are read when a batch is built."""

    def __init__(
        self,
        vlm: VLM,
        sources: list[tuple[Path, Path | None]],
        max_length: int,
        volume_tokens: int = DEFAULT_VOLUME_TOKENS,
    ) -> None:
        self.vlm = vlm
        self.samples: list[Sample] = []
        for path, image_root in sources:
            root = Path(image_root) if image_root else Path(path).parent
            for i, rec in enumerate(read_rows(path)):
                self.samples.append(tokenize(vlm, rec, root, max_length, f"{path}[{i}]", volume_tokens))

    def __len__(self) -> int:
        return len(self.samples)

    def lengths(self, image_size: int | None = None) -> list[int]:
        """Token counts with images fed at `image_size` px (None: the vision tower's own size)."""
        extra = image_tokens_at(self.vlm.model.config, image_size) - self.vlm.model.config.image_seq_length
        return [len(s.input_ids) + extra * s.n_images for s in self.samples]

    def __getitem__(self, key: int | tuple[int, int | None]) -> Item:
        """`dataset[i]`, or `dataset[i, size]` for the sample with its images at `size` px (the key
        carries the size so that DataLoader workers need no shared state). The images: PIL images, or
        for a native-route model one list of T slabs per input."""
        i, size = key if isinstance(key, tuple) else (key, None)
        cfg = self.vlm.model.config
        s = resize_image_tokens(
            self.samples[i], cfg.image_token_id, cfg.image_seq_length, image_tokens_at(cfg, size), size
        )
        images = []
        for p in s.images:
            try:
                side = size or cfg.vision_config.image_size
                images.append(read_image(p, self.vlm.preprocessing, size=side))
            except (OSError, ValueError) as e:
                raise ValueError(f"sample id {s.id}: image {p} is unreadable ({e})") from e
        if s.frames:
            images = [[im] * s.frames for im in images]
        if s.volume is not None:
            # The image processor brings each slab to the tower's side, as it does a 2D image.
            slabs = volume_slabs(np.load(s.volume, allow_pickle=False), s.slabs)
            if s.frames:
                images.append(slabs)
            else:
                images.extend(slabs)
        return s, images


class Collator:
    """Right-padded batch; pixel values of every image, in the order their tokens appear.

    `loss_weights` give each label its share of the loss: 1 per assistant token ("token"), or
    1 / (the sample's assistant tokens) ("sample"); `loss_units` counts what the loss is divided by
    (tokens or samples), `num_tokens` the non-padding tokens."""

    def __init__(self, vlm: VLM, loss_normalization: str = "token", vision_filler: bool = False) -> None:
        self.image_processor = vlm.processor.image_processor
        self.pad_id = vlm.tokenizer.pad_token_id
        self.per_sample = loss_normalization == "sample"
        self.config = vlm.model.config
        self.vision_filler = vision_filler
        self.frames = native_frames(self.config)

    def filler(self, batch: list[Item]) -> list[Item]:
        """For a batch without images (`vision_filler` on): one black image, its image tokens and one
        label of weight 0, so that the vision tower and projector take part in every micro-batch's
        forward and backward. Sharded training needs that: FSDP and ZeRO-3 gather a module's
        parameters when it runs and reduce its gradients when its backward runs, and a rank without
        images would skip those collectives while the others wait in them. The loss and every
        gradient are unchanged (the label weighs 0; its own packed sample or row, so no other token
        sees it); its tokens count as padding, not as useful tokens."""
        if not self.vision_filler or any(images for _, images in batch):
            return []
        size = batch[0][0].image_size
        n = image_tokens_at(self.config, size)
        side = size or self.config.vision_config.image_size
        ids = [self.config.image_token_id] * n + [self.pad_id]
        sample = Sample(FILLER_ID, ids, [IGNORE] * n + [self.pad_id], [], size)
        black = Image.new("RGB", (side, side))
        return [(sample, [[black] * self.frames if self.frames else black])]

    def weights(self, sample: Sample, labels: torch.Tensor) -> torch.Tensor:
        """One sample's label weights; its first position never has a prediction behind it."""
        if sample.id == FILLER_ID:
            return torch.zeros(len(labels))
        w = (labels != IGNORE).float()
        w[0] = 0
        return w / w.sum().clamp(min=1) if self.per_sample else w

    @staticmethod
    def head_positions(labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The positions whose next token has a label, in any row: where the LM head has to run.
        Computed here, on the CPU, so the training step never waits on the GPU to find them."""
        return {"head_positions": torch.nonzero((labels[:, 1:] != IGNORE).any(0)).reshape(-1)}

    def counts(self, batch: list[Item], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.per_sample:  # a packed row holds several samples: count the samples with a label
            units = sum(any(x != IGNORE for x in s.labels[1:]) for s, _ in batch)
        else:
            units = int((weights > 0).sum())
        return {
            "loss_units": torch.tensor(units),
            "num_tokens": torch.tensor(sum(len(s.input_ids) for s, _ in batch)),
        }

    def pixels(self, batch: list[Item]) -> dict[str, torch.Tensor]:
        images = [im for _, ims in batch for im in ims]
        if not images:
            return {}
        if self.frames:  # [n, T, C, H, W]
            volumes = [tower_slabs(self.config, slabs) for slabs in images]
            return {"pixel_values": self.image_processor(volumes, return_tensors="pt")["pixel_values"]}
        size = batch[0][0].image_size
        kwargs = {"size": {"height": size, "width": size}} if size else {}
        return {"pixel_values": self.image_processor(images, return_tensors="pt", **kwargs)["pixel_values"]}

    def __call__(self, batch: list[Item]) -> dict[str, torch.Tensor]:
        rows = batch + self.filler(batch)
        width = max(len(s.input_ids) for s, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        weights = torch.zeros((len(rows), width))
        for i, (s, _) in enumerate(rows):
            n = len(s.input_ids)
            ids[i, :n] = torch.tensor(s.input_ids)
            labels[i, :n] = torch.tensor(s.labels)
            mask[i, :n] = 1
            weights[i, :n] = self.weights(s, labels[i, :n])
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask, "loss_weights": weights}
        return out | self.head_positions(labels) | self.counts(batch, weights) | self.pixels(rows)
