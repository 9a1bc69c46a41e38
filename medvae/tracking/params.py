"""Run params from a training config: flattened to ``a.b.c`` names, with the values of path keys
(which can carry patient names) replaced by a short digest.
"""
from __future__ import annotations

from typing import Any, Mapping


def flatten(d: Mapping[str, Any], *, prefix: str = "") -> dict[str, Any]:
    """Flatten nested config dicts to ``a.b.c`` keys, for ``mlflow.log_params``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix=key + "."))
        else:
            out[key] = v
    return out


#: config keys whose values are user paths: logged as a digest, because file names can carry
#: patient names or IDs.
PATH_KEYS = ("data.paths", "data.val_paths", "data.exclude", "data.manifest", "data.store", "init_from",
             "output_dir", "tracking.uri")


#: config keys whose values are a shipped recipe's name (kept) or a YAML path (digested, as PATH_KEYS)
RECIPE_KEYS = ("corruption.recipe", "corruption.val_recipe")


def _is_path(key: str, value: Any) -> bool:
    """Whether ``value`` of config key ``key`` is a user path, which MLflow sees only as a digest."""
    if value in (None, [], ""):
        return False
    if key in RECIPE_KEYS:
        from medvae import resources

        return str(value) not in resources.names("recipes")  # a recipe file's path can name a patient too
    return key in PATH_KEYS


def recipe_label(recipe: Any) -> Any:
    """A recipe as a checkpoint's ``meta`` and MLflow may name it: a shipped recipe by its name, a
    YAML file by ``"sha1:<digest>"`` of its path, a keyed HMAC-SHA1 (:mod:`medvae.identifiers`; the
    value below is the test suite's key's, this installation's differs).

    >>> recipe_label("train"), recipe_label("DOE^JANE/noise.yaml")
    ('train', 'sha1:a473155209dd')
    """
    return f"sha1:{_digest(recipe)}" if _is_path(RECIPE_KEYS[0], recipe) else recipe


def _digest(value: Any) -> str:
    """Keyed (:func:`medvae.identifiers.keyed_digest`): a plain hash of a path gave the patient ID back
    to a guess of the folder layout in a second."""
    from medvae.identifiers import keyed_digest

    return keyed_digest(repr(value))


def config_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened config for ``mlflow.log_params``; path-valued keys become a short digest."""
    params = flatten(config)
    for key in (*PATH_KEYS, *RECIPE_KEYS):
        if key in params and (key in PATH_KEYS or _is_path(key, params[key])):
            params[f"{key}_sha1"] = _digest(params.pop(key))
    return {k: (str(v)[:500] if isinstance(v, (list, tuple, dict)) else v) for k, v in params.items()}


def redacted_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A nested config with the values of :data:`PATH_KEYS` (and recipe paths, :data:`RECIPE_KEYS`)
    replaced by ``"sha1:<digest>"`` (keyed, as :func:`recipe_label`'s): what a
    checkpoint sent to MLflow may carry (its paths can hold patient names).

    Examples
    --------
    >>> redacted_config({"data": {"paths": ["DOE^JANE/ct"], "patch_size": 128}})["data"]
    {'paths': 'sha1:6a4f6059d446', 'patch_size': 128}
    """
    def walk(d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping):
                out[k] = walk(v, key + ".")
            else:
                out[k] = f"sha1:{_digest(v)}" if _is_path(key, v) else v
        return out

    return walk(config, "")
