"""Format-agnostic tensor I/O: lazy readers and atomic output folders."""

from nextoffline.io.reader import TensorReader, open_tensors, register_state_loader
from nextoffline.io.writer import AtomicOutputDir, check_output_location, copy_file, write_json, write_safetensors, write_text

__all__ = [
    "AtomicOutputDir",
    "TensorReader",
    "check_output_location",
    "copy_file",
    "open_tensors",
    "register_state_loader",
    "write_json",
    "write_safetensors",
    "write_text",
]
