"""``--device-map``, ``--max-memory``, ``--offload-folder``: a model placed by accelerate (see actsparse.models.placement)."""

from __future__ import annotations

from actsparse.errors import ActsparseError


def add_placement_options(group) -> None:
    group.add_argument(
        "--device-map",
        default=None,
        metavar="MAP",
        help="auto: spread the model over the GPUs, then the CPU and disk (accelerate); --device is then not used",
    )
    group.add_argument(
        "--max-memory",
        default=None,
        metavar="DEV=SIZE,...",
        help="with --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB (what does not fit goes to disk)",
    )
    group.add_argument(
        "--offload-folder",
        default=None,
        metavar="DIR",
        help="with --device-map: where disk-offloaded weights go (default: a temporary directory)",
    )


def parse_max_memory(text: str) -> dict:
    memory = {}
    for part in text.split(","):
        device, sep, size = part.strip().partition("=")
        if not sep or not device or not size:
            raise ActsparseError(f"cannot parse --max-memory entry {part.strip()!r}; use DEVICE=SIZE, e.g. 0=70GiB,cpu=200GiB")
        memory[int(device) if device.isdigit() else device] = size
    return memory


def placement_from(args) -> dict:
    """``load_model``'s placement keywords from the options (empty without --device-map)."""
    device_map = getattr(args, "device_map", None)
    memory, folder = getattr(args, "max_memory", None), getattr(args, "offload_folder", None)
    if device_map is None:
        if memory or folder:
            raise ActsparseError("--max-memory and --offload-folder place a model with --device-map; add --device-map auto")
        return {}
    return {"device_map": device_map, "max_memory": parse_max_memory(memory) if memory else None, "offload_folder": folder}
