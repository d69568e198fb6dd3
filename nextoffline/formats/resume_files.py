"""No silent loss: a ``--resumable`` writer refuses a checkpoint that holds weights it does not rewrite.

Every writer declares, for the checkpoint it copies, the weight-bearing files it rewrites and the
files that hold no weights its trainer loads on resume (optimizer moments, RNG state, a critic
that is not extrapolated). :func:`check_resume_files` walks the checkpoint before anything is
written; any other file that can carry weights (``*.pt``, ``*.pth``, ``*.bin``, ``*.safetensors``,
``*.distcp``, ``*.ckpt``, a ``torch.distributed.checkpoint`` or Megatron ``dist_ckpt`` folder) makes
the writer refuse with :class:`~nextoffline.errors.UnhandledCheckpointError`, naming the file and
what it is. So a layout added later (ZeRO-3, tensor parallel, FSDP, Megatron) can never resume with
the old LoRA while nextoffline exits 0.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nextoffline.errors import UnhandledCheckpointError

__all__ = ["WEIGHT_SUFFIXES", "ResumeFiles", "check_resume_files", "describe_weight_file", "most_telling", "weight_bearing_files"]

#: File suffixes that can hold tensors a trainer loads.
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".distcp", ".ckpt")

#: What a weight file found in a checkpoint is, for the error message (first match wins).
_KINDS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), kind)
    for pattern, kind in (
        (r"^zero_pp_rank_\d+_mp_rank_(?!00_)\d+_model_states\.pt$", "DeepSpeed ZeRO-3 module states of a tensor-parallel rank > 0"),
        (r"^zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$", "DeepSpeed ZeRO-3 partitioned module states"),
        (r"^(bf16_)?zero_pp_rank_\d+_mp_rank_(?!00_)\d+_optim_states\.pt$", "DeepSpeed optimizer states of a tensor-parallel rank > 0"),
        (r"^mp_rank_(?!00_)\d+_model_states\.pt$", "DeepSpeed module states of a tensor-parallel rank > 0"),
        (r"^layer_\d+-model_\d+-model_states\.pt$", "DeepSpeed pipeline-parallel layer states"),
        (r"^(bf16_)?zero_pp_rank_\d+_mp_rank_00_optim_states\.pt$", "DeepSpeed ZeRO optimizer states (fp32 master weights)"),
        (r"^pytorch_model_fsdp(_\d+)?_rank\d+\.bin$", "accelerate FSDP LOCAL_STATE_DICT or per-rank (use_dcp=False) model shard"),
        (r"^pytorch_model_fsdp(_\d+)?\.bin$", "accelerate FSDP FULL_STATE_DICT model"),
        (r"^pytorch_model_fsdp_\d+$", "accelerate FSDP SHARDED_STATE_DICT model (torch.distributed.checkpoint folder)"),
        (r"^dist_ckpt$", "Megatron distributed checkpoint (dist_ckpt)"),
        (r"\.distcp$", "torch.distributed.checkpoint shard"),
        (r"^model_world_size_\d+_rank_\d+\.pt$", "FSDP model shard"),
        (r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$", "full model weights"),
        (r"^adapter_model\.(safetensors|bin)$", "PEFT adapter"),
    )
)


def _kind_index(path: Path) -> int:
    return next((i for i, (pattern, _kind) in enumerate(_KINDS) if pattern.search(path.name)), len(_KINDS))


def most_telling(paths: Iterable[Path]) -> Path:
    """The file whose kind says most about the layout (e.g. ZeRO-3 module states before optimizer states)."""
    return min(paths, key=lambda p: (_kind_index(p), str(p)))


def describe_weight_file(path: Path) -> str:
    """A short name for what a weight-bearing file or folder is."""
    index = _kind_index(path)
    if index < len(_KINDS):
        return _KINDS[index][1]
    return "unknown weight file" if path.is_file() else "unknown checkpoint folder"


def _is_weight_dir(path: Path) -> bool:
    """A folder that is one checkpoint as a whole (DCP ``.metadata``, Megatron ``dist_ckpt``, accelerate FSDP)."""
    return path.name == "dist_ckpt" or re.match(r"^pytorch_model_fsdp_\d+$", path.name) is not None or (path / ".metadata").is_file()


def weight_bearing_files(root: Path) -> Iterator[Path]:
    """Files and checkpoint folders under ``root`` that can hold weights, in a stable order.

    A folder that is one checkpoint as a whole is yielded itself; its contents are not walked.
    """
    for child in sorted(root.iterdir()):
        if child.is_dir():
            if _is_weight_dir(child):
                yield child
            else:
                yield from weight_bearing_files(child)
        elif child.suffix in WEIGHT_SUFFIXES:
            yield child


@dataclass(frozen=True)
class ResumeFiles:
    """What one ``--resumable`` writer knows about the checkpoint folder it copies.

    Attributes:
        root: the checkpoint folder the writer copies (the trainer's resume path).
        layout: the layout in words, for messages (e.g. ``"TRL + DeepSpeed ZeRO-2"``).
        rewritten: every weight-bearing file or folder the writer rewrites with the new LoRA.
        weightless: glob patterns (relative to ``root``, ``/``-separated) of files copied unchanged
            because the trainer loads no LoRA weights from them on resume.
        supported: what the writer handles, for the fix in the message.
    """

    root: Path
    layout: str
    rewritten: frozenset[Path] = field(default_factory=frozenset)
    weightless: tuple[str, ...] = ()
    supported: str = ""

    def unhandled(self) -> list[Path]:
        """Weight-bearing files of ``root`` that are neither rewritten nor declared weightless."""
        rewritten = {p.resolve() for p in self.rewritten}
        found = []
        for path in weight_bearing_files(self.root):
            relative = path.relative_to(self.root).as_posix()
            if path.resolve() in rewritten or any(fnmatch.fnmatchcase(relative, pattern) for pattern in self.weightless):
                continue
            found.append(path)
        return found


def check_resume_files(files: ResumeFiles | Iterable[ResumeFiles]) -> None:
    """Refuse (before anything is written) when a checkpoint holds a weight file the writer does not rewrite.

    Raises:
        UnhandledCheckpointError: names the first such file, what it is, the layout and the fix.
    """
    for declared in [files] if isinstance(files, ResumeFiles) else files:
        unhandled = declared.unhandled()
        if not unhandled:
            continue
        first = most_telling(unhandled)
        more = f" (and {len(unhandled) - 1} more)" if len(unhandled) > 1 else ""
        supported = f"; --resumable supports {declared.supported}" if declared.supported else ""
        raise UnhandledCheckpointError(
            f"{first}: {describe_weight_file(first)}{more} in a {declared.layout} checkpoint is not rewritten by --resumable, "
            f"so the trainer would resume from the old LoRA{supported}; use the extrapolated adapter folder "
            "(PeftModel.from_pretrained) instead"
        )
