"""Sharded checkpoints (--fsdp): each process writes and reads its own slices of the masters
and of AdamW's state, with torch's distributed checkpoint (DCP).

    RUN/checkpoints/step-000120/sharded/
        .metadata                    what the checkpoint holds, by name, and where each slice lies
        __0_0.distcp, __1_0.distcp   one file per process: "weights.NAME" (float32 masters) and
                                     "optimizer.NAME.exp_avg" / ".exp_avg_sq" / ".step"

Reading cuts the saved slices to the reader's split (DCP's resharding): whole tensors for a run
without --fsdp or one process alone (an export), slices for a sharded run of any size. AdamW's
state travels by parameter name (`named_optimizer_state`), not by the optimizer's positions, so
a whole checkpoint's optimizer.pt and a sharded one load into either kind of run alike.
checkpoint.py stages the folder, adds state.json and rng.pt, and chooses between the kinds.

torch.distributed.checkpoint is imported where used: with it, every command would start about a
second later (it imports torch.distributed.tensor).
"""

import errno
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from minituner.errors import UserError
from minituner.sharding import distribute_like

SHARDED = "sharded"  # the DCP folder's name inside a checkpoint


def write_sharded(folder: Path, masters, optimizer=None) -> None:
    """Every process writes its slices of the masters (and AdamW's state) into `folder`; returns
    when all have. A process's failure (a full disk) raises its OSError in every process."""
    import torch.distributed.checkpoint as dcp
    parts = {"weights": {name: m.detach() for name, m in masters.named_masters()}}
    if optimizer is not None:
        parts["optimizer"] = named_optimizer_state(optimizer, masters)
    try:
        dcp.save(parts, checkpoint_id=folder)
    except dcp.api.CheckpointException as e:
        failed = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        oserror = next((f for f in failed if isinstance(f, OSError)), None)
        if oserror is None:
            raise
        raise oserror from None


def load_sharded_weights(folder: Path, targets: dict[str, torch.Tensor], *, collective: bool, source) -> None:
    """Read the saved masters into `targets` {name: tensor} in place: sharded masters (every process,
    collective) or whole tensors (a run without --fsdp, or this process alone)."""
    _dcp_load({"weights": targets}, folder, collective=collective, source=source)


def load_sharded_optimizer(folder: Path, optimizer, masters, *, collective: bool, source) -> None:
    """Read the saved AdamW state into `optimizer`, sliced as the masters are (or whole). A KeyError
    for a parameter the masters do not have."""
    by_name = dict(masters.named_masters())
    named = {}
    for key, (shape, dtype) in saved_shapes(folder, "optimizer").items():
        name, field = key.rsplit(".", 1)  # NAME.exp_avg
        if name not in by_name:
            raise KeyError(name)
        like = by_name[name]
        named.setdefault(name, {})[field] = (torch.zeros_like(like) if tuple(shape) == tuple(like.shape)
                                             else torch.zeros(shape, dtype=dtype))
    _dcp_load({"optimizer": named}, folder, collective=collective, source=source)
    load_named_optimizer_state(optimizer, masters, named)


def named_optimizer_state(optimizer, masters, saved: dict | None = None) -> dict[str, dict]:
    """AdamW's state of each trained parameter by its name ({"step", "exp_avg", "exp_avg_sq"}), of
    `optimizer` or of a state_dict() it saved (which numbers the parameters by position)."""
    name_of = {id(m): name for name, m in masters.named_masters()}
    if saved is None:
        return {name_of[id(p)]: dict(optimizer.state[p]) for group in optimizer.param_groups
                for p in group["params"] if p in optimizer.state}
    named = {}
    for saved_group, group in zip(saved["param_groups"], optimizer.param_groups, strict=True):
        for i, p in zip(saved_group["params"], group["params"], strict=True):
            if i in saved["state"]:
                named[name_of[id(p)]] = saved["state"][i]
    return named


def load_named_optimizer_state(optimizer, masters, named: dict[str, dict]) -> None:
    """Give `optimizer` the state `named` holds by parameter name; whole tensors are sliced as
    their sharded parameter is."""
    by_name = dict(masters.named_masters())
    position = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    state_dict = optimizer.state_dict()
    state_dict["state"] = {position[id(by_name[name])]: {k: distribute_like(v, by_name[name]) for k, v in s.items()}
                           for name, s in named.items()}
    optimizer.load_state_dict(state_dict)


def saved_shapes(folder: Path, part: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """{name: (shape, dtype)} of what a sharded checkpoint holds under `part` (weights, optimizer)."""
    prefix = part + "."
    return {key[len(prefix):]: (meta.size, meta.properties.dtype) for key, meta in sharded_keys(folder).items()
            if key.startswith(prefix) and hasattr(meta, "size")}


def sharded_keys(folder: Path) -> dict:
    """A DCP folder's table of contents, after checking that every file it names is there."""
    import torch.distributed.checkpoint as dcp
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    sizes = {}  # file -> the bytes its entries reach
    for info in (metadata.storage_data or {}).values():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sizes.items():
        path = Path(folder) / name
        if not path.is_file():
            raise OSError(errno.ENOENT, f"{name} is missing")
        if path.stat().st_size < size:
            raise OSError(errno.EIO, f"{name} is cut short ({path.stat().st_size} of {size} bytes)")
    return metadata.state_dict_metadata


def _dcp_load(parts: dict, folder: Path, *, collective: bool, source) -> None:
    """dcp.load into `parts` in place: with every process (collective) or by this one alone."""
    import torch.distributed.checkpoint as dcp
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # (no_dist: meant)
            dcp.load(parts, checkpoint_id=str(folder), no_dist=not collective or not dist.is_initialized())
    except (RuntimeError, ValueError, OSError, dcp.api.CheckpointException) as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise UserError(f"{source}: cannot read the checkpoint ({reason})") from None
