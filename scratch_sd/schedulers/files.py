"""diffusers' scheduler file layout: `<folder>[/<subfolder>]/scheduler_config.json`, a sorted JSON object of the
config plus `_class_name` (the diffusers class) and `_diffusers_version`. Stdlib json only; local folders only."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

CONFIG_NAME = "scheduler_config.json"  # diffusers' SchedulerMixin.config_name
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release these schedulers are proven equal to (written as _diffusers_version)


def _json_value(value: Any) -> Any:
    """What diffusers' to_json_string does to a config value: arrays and tuples become lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


class ConfigFiles:
    """save_config / save_pretrained / load_config / from_pretrained of a Scheduler (which supplies
    `config`, `register_to_config`, `from_config` and DIFFUSERS_NAME)."""



    def to_json_string(self) -> str:
        """The config as diffusers writes it: `_class_name` and `_diffusers_version` added, sorted keys.

        As diffusers (whose to_json_string writes into its own config dict), the two metadata keys are then
        also in `self.config`."""
        self.register_to_config(_class_name=self.DIFFUSERS_NAME, _diffusers_version=DIFFUSERS_VERSION)
        out = {k: _json_value(v) for k, v in self.config.items() if k not in ("_ignore_files", "_use_default_values")}
        return json.dumps(out, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write `scheduler_config.json` into `save_directory` (created if missing), readable by
        `diffusers.<Class>.from_pretrained(save_directory)`."""
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        if kwargs.get("push_to_hub"):
            raise ValueError("save_config(push_to_hub=True): scratch_sd writes local folders only")
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """diffusers' SchedulerMixin.save_pretrained: the same as save_config."""
        self.save_config(save_directory, **kwargs)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                    **kwargs: Any) -> dict[str, Any]:
        """The config dict of a local `scheduler_config.json`: a file path, a folder, or folder/subfolder
        (as diffusers' load_config; the Hub is not reached, a missing file is an OSError)."""
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(path):
            config_file = path
        elif os.path.isdir(path):
            if subfolder is not None and os.path.isfile(os.path.join(path, subfolder, CONFIG_NAME)):
                config_file = os.path.join(path, subfolder, CONFIG_NAME)
            elif os.path.isfile(os.path.join(path, CONFIG_NAME)):
                config_file = os.path.join(path, CONFIG_NAME)
            else:
                raise OSError(f"Error no file named {CONFIG_NAME} found in directory {path}"
                              + (f" (subfolder {subfolder!r})" if subfolder else "") + ".")
        else:
            raise OSError(f"{path} is not a local file or folder; scratch_sd loads schedulers from local folders only")
        try:
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise OSError(f"It looks like the config file at '{config_file}' is not a valid JSON file.") from None
        if not isinstance(config, dict):
            raise OSError(f"It looks like the config file at '{config_file}' is not a JSON object.")
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        return_unused_kwargs: bool = False, **kwargs: Any):
        """A scheduler from a local folder diffusers' `save_pretrained` (or ours) wrote; `kwargs` override keys."""
        for hub_only in ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision"):
            kwargs.pop(hub_only, None)
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
