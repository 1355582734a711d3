"""What ``model.checkpoint`` decides of the config: a diffusers ``UNet2DModel`` folder fixes the U-Net.

The folder's ``config.json`` decides ``model.unet_ch``, ``model.unet_ch_mult``,
``model.unet_num_res_blocks``, ``model.unet_attn_resolutions`` and the image side
``data.image_size``; its DDPMScheduler config, where it has one, decides
``diffusion.num_train_steps`` and ``diffusion.beta_schedule``
(:func:`sftrl.models.diffusers_unet.config_settings`).

The rule, for each of those keys:

* set in the config file or by an override: it must agree with the folder, else a one-line
  ``ConfigError`` naming the key, both values and where each comes from;
* not set: it takes the folder's value, as an override appended after the user's (so the run's
  resolved ``config.yaml`` holds it, and a resumed run reads it back as set).

``model.unet_attn_resolutions`` is compared on the levels the network has (a size no level has
adds no attention). ``data.image_size``: ``null`` counts as not set, and it is filled only where
the data set's own side differs from the folder's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from sftrl.configtools import ConfigError, apply_overrides, flat_dict, load_yaml_file, short_repr


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """The overrides a diffusers ``model.checkpoint`` adds, and the first disagreement, if any."""

    overrides: tuple[str, ...] = ()
    error: ConfigError | None = None

    @classmethod
    def of(cls, schema: type, path: str | os.PathLike[str] | None, overrides: Sequence[str]) -> CheckpointSettings:
        """Read the config file and ``overrides`` as given (nothing filled in) and, where
        ``model.checkpoint`` names a diffusers folder, compare them with it. A config that
        cannot be read is left to the config loader's own errors."""
        try:
            given = flat_dict(apply_overrides(load_yaml_file(path) if path is not None else {}, overrides, schema))
        except ConfigError:
            return cls()
        checkpoint = given.get("model.checkpoint")
        if not isinstance(checkpoint, str) or not os.path.isdir(os.path.expanduser(checkpoint)):
            return cls()  # a checkpoint file (or none): the config decides everything
        from sftrl.models.diffusers_unet import DiffusersFormatError, config_settings, unet_folder

        if unet_folder(checkpoint) is None:
            return cls()  # loading it says what is wrong with the folder
        try:
            settings = config_settings(checkpoint)
        except DiffusersFormatError as err:
            return cls(error=ConfigError(f"'model.checkpoint' = {checkpoint!r}: {err}", key="model.checkpoint"))
        added = []
        for key, (value, source) in settings.items():
            if given.get(key) is None:  # not set (data.image_size: null is its "not set")
                if key != "data.image_size" or _native_size(given) != value:
                    added.append(f"{key}={json.dumps(value)}")
            elif _normalised(key, given[key], settings) != _normalised(key, value, settings):
                return cls(error=ConfigError(
                    f"'{key}' = {short_repr(given[key])} disagrees with the diffusers folder model.checkpoint = "
                    f"{checkpoint!r}, whose {source} gives {json.dumps(value)}: leave '{key}' out to take the "
                    "folder's value, or set it to that", key=key))
        return cls(tuple(added))

    def check(self) -> None:
        """Raise the disagreement (``load_config`` then names the file or override that set the key)."""
        if self.error is not None:
            raise self.error


def _native_size(given: Mapping[str, Any]) -> int | None:
    from sftrl.data import NATIVE_SIZE

    return NATIVE_SIZE.get(str(given.get("data.name")))


def _normalised(key: str, value: Any, settings: Mapping[str, tuple[Any, str]]) -> Any:
    """``value`` as compared: lists as lists, attention sizes only where the network has a level."""
    if key == "model.unet_attn_resolutions" and isinstance(value, (list, tuple)):
        size, levels = settings["data.image_size"][0], len(settings["model.unet_ch_mult"][0])
        sizes = {size // 2**i for i in range(levels)}
        return sorted({r for r in value if r in sizes})
    return list(value) if isinstance(value, tuple) else value
