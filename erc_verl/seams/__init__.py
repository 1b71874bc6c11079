"""Where erc-verl plugs into stock verl (0.9.x): each module is one narrow, version-checked seam.

- ``engine``: hands the old-policy entropy verl already computes to the loss; the current entropy without a graph.
- ``actor_loss``: verl's ``ppo_loss`` with the entropies passed on to an ERC policy loss (and ``positive_nll``).
- ``workers`` / ``trainer``: the actor worker and Ray trainer that install those two, only for ERC losses.
- ``preflight`` / ``errors``: config checks on the driver, before Ray starts (errors name the key and the fix).
- ``diagnostics``: opt-in sampled token records for the paper's scatter figures.
- ``run_identity``: which trainer, mode, replay buffer and loss a run used, as JSON next to verl's metrics.
- ``quiet``: verl's import-time notices off for our command lines.
- ``cpu``: CPU mode, a platform in verl's platform registry (``VERL_PLATFORM=cpu``) plus vLLM-CPU settings.

May import verl and ``erc_verl.algorithm``; never ``erc_verl.paper`` or ``erc_verl.demo`` (tests/test_layout.py).
The entry point that uses them is ``erc_verl.main_ppo``.
"""
