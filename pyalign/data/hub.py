"""Hub data sets without hanging: a cached copy is used offline, a missing one fails in seconds.

``datasets.load_dataset(name)`` talks to the hub first and falls back to its local cache only
after the request fails, which on a machine whose network silently drops packets can take
minutes (etag and API timeouts of 10-100 s, retried). So before asking ``datasets``, pyalign
checks whether the hub answers at all, with one HTTP request bounded by
``$PYALIGN_HUB_TIMEOUT`` seconds (default 5; the answer is reused for 5 minutes, so a config with
several hub sources waits once):

- it answers: ``datasets`` loads the data set as usual (downloading it, or reusing its cache);
- it does not (or ``HF_HUB_OFFLINE=1``): ``datasets`` runs in offline mode, which serves the copy
  in its cache (``$HF_DATASETS_CACHE``) if there is one; otherwise a
  :class:`HubDatasetUnavailable` error names the data set and how to provide it locally.
"""

from __future__ import annotations

import contextlib
import os
import time

DEFAULT_PROBE_TIMEOUT = 5.0
PROBE_TIMEOUT_ENV = "PYALIGN_HUB_TIMEOUT"


class HubDatasetUnavailable(FileNotFoundError):
    """A hub data set is neither cached locally nor reachable."""


def probe_timeout() -> float:
    value = os.environ.get(PROBE_TIMEOUT_ENV)
    if value is None:
        return DEFAULT_PROBE_TIMEOUT
    try:
        timeout = float(value)
    except ValueError:
        raise ValueError(f"${PROBE_TIMEOUT_ENV}: expected seconds (a positive number), got {value!r}") from None
    if timeout <= 0:
        raise ValueError(f"${PROBE_TIMEOUT_ENV}: expected seconds (a positive number), got {value!r}")
    return timeout


_PROBES: dict[tuple[str, float], tuple[float, tuple[bool, str]]] = {}
PROBE_REUSE_SECONDS = 300.0  # a config with many hub sources pays for one probe, not one each


def hub_reachable(endpoint: str, timeout: float) -> tuple[bool, str]:
    """Whether ``endpoint`` answers an HTTP request within ``timeout`` seconds (any status
    counts: the server is there), and why not; the answer is reused for a few minutes."""
    key = (endpoint, timeout)
    if key in _PROBES and time.monotonic() - _PROBES[key][0] < PROBE_REUSE_SECONDS:
        return _PROBES[key][1]
    result = _probe(endpoint, timeout)
    _PROBES[key] = (time.monotonic(), result)
    return result


def _probe(endpoint: str, timeout: float) -> tuple[bool, str]:
    import socket  # noqa: PLC0415
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    try:
        with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout):
            pass
    except urllib.error.HTTPError:  # an HTTP answer, whatever its status: the server is there
        return True, ""
    except (TimeoutError, socket.timeout):
        return False, f"no answer from {endpoint} within {timeout:g} s"
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return False, f"no answer from {endpoint} within {timeout:g} s"
        return False, f"cannot connect to {endpoint}: {type(reason).__name__}"
    return True, ""


@contextlib.contextmanager
def offline_mode():
    """``datasets`` and ``huggingface_hub`` in offline mode for the duration (both read the flag
    when a request is made)."""
    import datasets.config  # noqa: PLC0415
    import huggingface_hub.constants  # noqa: PLC0415

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def how_to_provide(name: str, config: str | None, data_dir: str | None) -> str:
    args = ", ".join([repr(name)] + ([repr(config)] if config else []) + ([f"data_dir={data_dir!r}"] if data_dir else []))
    return (
        "To use it here, on a machine with network run\n"
        f"    python -c \"import datasets; datasets.load_dataset({args}).save_to_disk('DIR')\"\n"
        f"  (or: huggingface-cli download --repo-type dataset {name} --local-dir DIR), copy DIR to this\n"
        "  machine and give it as the source's path (path: DIR, or `pyalign data inspect DIR`) instead of\n"
        "  its name. A copy in the datasets cache ($HF_DATASETS_CACHE) is found automatically."
    )


def load_hub_dataset(name: str, *, config: str | None = None, data_dir: str | None = None, split: str = "train",
                     revision: str | None = None, cache_dir: str | None = None):
    """``datasets.Dataset`` for split ``split`` of hub data set ``name``; see the module docstring."""
    import datasets  # noqa: PLC0415

    kwargs = {"name": config, "data_dir": data_dir, "split": split, "revision": revision, "cache_dir": cache_dir}
    label = name + (f" (config {config})" if config else "") + (f" (data_dir {data_dir})" if data_dir else "")
    if datasets.config.HF_HUB_OFFLINE:
        reachable, reason = False, "offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)"
    else:
        reachable, reason = hub_reachable(datasets.config.HF_ENDPOINT, probe_timeout())
    if reachable:
        try:
            return datasets.load_dataset(name, **kwargs)
        except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as error:
            raise HubDatasetUnavailable(f"data set {label}: not found on the hub ({error})") from None
        except ValueError as error:  # unknown split or config
            raise ValueError(f"data set {label}: {error}") from None
    with offline_mode():
        try:
            return datasets.load_dataset(name, **kwargs)
        except Exception as error:  # noqa: BLE001 - any failure here means: not usable offline
            cache = cache_dir or datasets.config.HF_DATASETS_CACHE
            detail = " ".join(str(error).split())[:300]
            raise HubDatasetUnavailable(
                f"data set {label}: not in the local datasets cache ({cache}) and the Hugging Face hub "
                f"cannot be reached ({reason}). [datasets: {detail}]\n  {how_to_provide(name, config, data_dir)}"
            ) from None
