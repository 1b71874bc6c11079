"""Where the driver's ``ray.init`` goes: an existing Ray cluster it joins, or a local one it starts.

verl's ``run_ppo`` calls ``ray.init(**ray_kwargs.ray_init)``. Ray joins a running cluster when it is given an
address (``ray_kwargs.ray_init.address``, or ``RAY_ADDRESS``, which ``ray job submit`` sets for a job's driver)
or when ``ray start`` on this machine left the cluster's address in Ray's temp dir; only a driver that starts
its own cluster may declare resources (``num_gpus``/``num_cpus``), and only that one passes its environment
to the workers. CPU mode asks this module which case a launch is, before ``ray.init``.

Ray's own rule is used, not a copy: ``ray._private.services.canonicalize_bootstrap_address``, the function
``ray.init`` calls (Ray 2.60, pinned in requirements/cpu.txt); tests/seams/test_ray_address.py fails when it
moves.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional

from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR as JOB_CONFIG_ENV  # as verl reads it

from erc_verl.seams.errors import ConfigError


def cluster_to_join(ray_init: Mapping) -> Optional[str]:
    """The address of the running Ray cluster ``ray.init(**ray_init)`` will connect to; None when it starts one."""
    address = ray_init.get("address")
    if address and "://" in address:  # Ray Client (ray://...): always a running cluster
        return address
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError as err:  # pragma: no cover - only on a Ray that moved it
        raise RuntimeError(
            "ray._private.services.canonicalize_bootstrap_address is gone (erc-verl is tested with Ray 2.60); "
            "erc_verl/seams/ray_address.py must be updated for this Ray version."
        ) from err
    try:
        return canonicalize_bootstrap_address(address, ray_init.get("_temp_dir"))
    except ConnectionError as err:  # address="auto" with no cluster running
        raise ConfigError(
            f"ray_kwargs.ray_init.address={address!r} (or RAY_ADDRESS) asks for a running Ray cluster and none was "
            "found; start one (scripts/ray_cluster.sh head) or drop the setting to let the run start its own."
        ) from err


def job_env_vars() -> dict:
    """The ``env_vars`` of the Ray job this driver runs in (``ray job submit --runtime-env``); {} outside a job."""
    job_config = json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}")
    return dict((job_config.get("runtime_env") or {}).get("env_vars") or {})
