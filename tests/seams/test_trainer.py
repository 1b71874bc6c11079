"""Trainer-side seam: verl's old-policy entropy reaches the update batch as `old_entropy` (V0 and V1).

The trainers' own methods run for real (verl's `_compute_old_log_prob` / `_update_actor` with our
overrides, real TransferQueue on a local Ray cluster for V1). The actor worker group is replaced by an
in-process stand-in, because verl's workers need GPUs: it runs verl's FSDP engine code on CPU
(erc_verl.bench.engine_rig) the way the worker would, and the update runs the ERC actor loss on what arrives.
"""

from functools import partial

import pytest
import torch
from hydra import compose, initialize_config_dir
from tensordict import TensorDict

from verl import DataProto
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.utils.padding import no_padding_2_padding, response_to_nested

from erc_verl.seams.actor_loss import ppo_loss_with_entropy
from erc_verl.configs import CONFIG_DIR
from erc_verl.seams.engine import DETACHED_ENTROPY_KEY, enable_detached_entropy
from erc_verl.bench.engine_rig import cpu_lm_engine, engine_on_cpu
from erc_verl.seams.trainer import ERCRayPPOTrainer, ERCTrainerV1Mixin, erc_v1_trainer_cls

from support.objects import padded_update_batch, tiny_qwen2, update_batch


def erc_config(loss_mode="grpo_erc", *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="erc_ppo_trainer", overrides=[
            f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
            "actor_rollout_ref.actor.ppo_mini_batch_size=4",
            "actor_rollout_ref.rollout.n=1",
            *overrides,
        ])


class CPUActorWorkerGroup:
    """Stands in for the Ray actor worker group (GPU-only in verl): same calls, verl's engine code on CPU."""

    def __init__(self, config):
        self.model = tiny_qwen2()
        self.actor_config = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
        self.updates = []
        self.loss_old_entropy = []  # (old_entropy, response_mask) as the ERC loss padded them, per call

    def infer(self, td):
        td = td.copy()
        tu.assign_non_tensor(td, calculate_entropy=True)
        with torch.no_grad(), engine_on_cpu():
            _, out = cpu_lm_engine(self.model).forward_step(td, loss_function=None, forward_only=True)
        return out["model_output"]

    def train(self, td):
        mask = td["response_mask"]
        # added by verl's TrainingWorker.train_batch / engine.forward_backward_batch on a single rank
        tu.assign_non_tensor(td, dp_size=1, use_remove_padding=True, use_fused_kernels=False,
                             batch_num_tokens=int((mask.values() if mask.is_nested else mask).sum()))
        engine = cpu_lm_engine(self.model)
        enable_detached_entropy(engine)

        def recording_loss(config, model_output, data, dp_group=None):
            padded = data.select("old_entropy", "response_mask").to_padded_tensor()
            self.loss_old_entropy.append((padded["old_entropy"], padded["response_mask"].bool()))
            return ppo_loss_with_entropy(config, model_output, data, dp_group)

        with engine_on_cpu():
            loss, out = engine.forward_step(td, partial(recording_loss, config=self.actor_config), False)
        loss.backward()
        self.updates.append((td, out["metrics"]))


def padded_batch(seed=0):
    """The left/right padded DataProto a V0 trainer holds, and the same batch in the engine's format."""
    raw = padded_update_batch(batch_size=4, seed=seed, old_entropy=False)
    return DataProto.from_single_dict(dict(raw.items())), update_batch(batch_size=4, seed=seed, old_entropy=False)


def test_v0_old_entropy_reaches_the_update_and_the_loss():
    config = erc_config()
    wg = CPUActorWorkerGroup(config)
    trainer = ERCRayPPOTrainer.__new__(ERCRayPPOTrainer)
    trainer.config = config
    trainer.actor_rollout_wg = wg
    batch, td = padded_batch()
    produced = []  # the old-policy entropy compute_log_prob handed to verl's trainer

    class V0Calls:
        def compute_log_prob(self, batch_td):
            assert tu.get(batch_td, "calculate_entropy") is True  # verl computes the old entropy already
            out = wg.infer(td)
            produced.append(out["entropy"].clone())
            return tu.get_tensordict({"log_probs": out["log_probs"], "entropy": out["entropy"]},
                                     non_tensor_dict={"metrics": {"mfu": 0.0}})

        def update_actor(self, batch_td):
            wg.train(batch_td)
            return tu.get_tensordict({}, non_tensor_dict={"metrics": {"mfu": 0.0}})

    trainer.actor_rollout_wg = V0Calls()
    old, _ = trainer._compute_old_log_prob(batch)
    old.batch.pop("entropys")  # what RayPPOTrainer.fit does after logging actor/entropy
    old.batch.pop("old_log_probs")
    batch = batch.union(old)

    trainer._update_actor(batch)
    (update_td, metrics), = wg.updates
    assert tu.get(update_td, DETACHED_ENTROPY_KEY) is True
    # what the ERC loss received as old_entropy is, token for token, what compute_log_prob produced
    (received, mask), = wg.loss_old_entropy
    expected = no_padding_2_padding(produced[0], td)
    assert torch.equal(mask, td["response_mask"].bool()) and torch.equal(received[mask], expected[mask])
    # the policy at update time is the old policy: ratio == 1, nothing clipped
    assert metrics["actor/erc_clipfrac"].aggregate() == 0.0
    assert metrics["actor/entropy_ratio_mean"].aggregate() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.integration
def test_v1_old_entropy_is_copied_in_transfer_queue_and_fetched_for_the_update():
    ray = pytest.importorskip("ray")
    import transfer_queue as tq
    from omegaconf import OmegaConf
    from transfer_queue import KVBatchMeta

    config = erc_config()
    trainer_cls = erc_v1_trainer_cls("sync")
    assert trainer_cls.__mro__[1] is ERCTrainerV1Mixin and trainer_cls.__mro__[2].__name__ == "PPOTrainerSync"
    trainer = trainer_cls.__new__(trainer_cls)
    trainer.config = config
    wg = CPUActorWorkerGroup(config)
    batch, td = padded_batch()
    keys = [f"sample-{i}" for i in range(4)]

    def tq_get(meta, fields=None):
        return tq.kv_batch_get(keys=meta.keys, partition_id=meta.partition_id, select_fields=fields or meta.fields)

    class V1Calls:  # what verl's tqbridge does around the worker methods
        def compute_log_prob(self, meta):
            out = wg.infer(td)
            tq.kv_batch_put(keys=meta.keys, partition_id=meta.partition_id,
                            fields=TensorDict({"log_probs": out["log_probs"], "entropy": out["entropy"]},
                                              batch_size=[4]))
            return meta

        def update_actor(self, meta):
            data = tq_get(meta)
            tu.assign_non_tensor(data, **meta.extra_info)
            wg.train(data)
            return tu.get_tensordict({}, non_tensor_dict={"metrics": {"mfu": 0.0}})

    trainer.actor_rollout_wg = V1Calls()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tq_conf = OmegaConf.merge(config.transfer_queue, {"enable": True})
        tq_conf.backend.SimpleStorage.num_data_storage_units = 1
        tq.init(tq_conf)
        # V1 keeps every per-sample field jagged in TransferQueue
        response_mask = torch.nested.as_nested_tensor(
            [row[: int(row.sum())] for row in td["response_mask"]], layout=torch.jagged)
        prompt_mask = batch.batch["attention_mask"][:, : td["prompts"].shape[1]]
        fields = {
            "input_ids": td["input_ids"],
            "position_ids": td["position_ids"],
            "prompts": torch.nested.as_nested_tensor([p[m.bool()] for p, m in zip(td["prompts"], prompt_mask)],
                                                     layout=torch.jagged),
            "responses": response_to_nested(td["responses"], response_mask),
            "response_mask": response_mask,
            "advantages": response_to_nested(td["advantages"], response_mask),
            "rollout_log_probs": response_to_nested(td["old_log_probs"], response_mask),  # from vLLM
        }
        meta = tq.kv_batch_put(keys=keys, partition_id="train", fields=TensorDict(fields, batch_size=[4]))
        meta = KVBatchMeta(keys=keys, tags=[{}] * 4, partition_id="train", fields=meta.fields, extra_info={})
        metrics = {}
        meta = trainer._compute_old_log_prob(meta, metrics)
        assert "old_entropy" in meta.fields and "actor/entropy" in metrics
        stored = tq_get(meta, ["entropy", "old_entropy"])
        torch.testing.assert_close(stored["old_entropy"].values(), stored["entropy"].values())
        trainer._update_actor(meta, {})
    finally:
        tq.close()
        ray.shutdown()
    (update_td, update_metrics), = wg.updates
    assert tu.get(update_td, DETACHED_ENTROPY_KEY) is True
    assert update_metrics["actor/erc_clipfrac"].aggregate() == 0.0


def _worker_mappings(mode, hybrid_engine, loss_mode="grpo_erc", *overrides):
    """role -> worker class, from the real ``_init_resource_pool_mgr`` of verl's trainer and of ours (it only
    fills dicts: no Ray cluster or GPU needed)."""
    from verl.trainer.ppo.v1 import get_trainer_cls

    config = erc_config(loss_mode, f"trainer.v1.trainer_mode={mode}", "actor_rollout_ref.actor.use_kl_loss=True",
                        f"actor_rollout_ref.hybrid_engine={hybrid_engine}", *overrides)
    mappings = []
    for cls in (get_trainer_cls(mode), erc_v1_trainer_cls(mode)):
        trainer = cls.__new__(cls)
        trainer.config = config
        trainer._enable_hybrid_replicas = hybrid_engine  # what PPOTrainerSeparateAsync.__init__ reads from config
        trainer._init_resource_pool_mgr()
        mappings.append(trainer.role_worker_mapping)
    return config, *mappings


def _init_model_with_verl_init_stubbed(worker_cls, config, monkeypatch):
    """Run the worker's init_model with verl's ActorRolloutRefWorker.init_model replaced by a CPU stand-in:
    verl's builds FSDP on a GPU, a rollout device mesh and an NCCL checkpoint engine. The stand-in sets what
    verl's sets for the actor: ``loss_fn = partial(ppo_loss, config=...)`` and a real TrainingWorker around
    verl's engine class (driven on CPU), with the loss installed by TrainingWorker.set_loss_fn."""
    from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker
    from verl.workers.utils.losses import ppo_loss as verl_ppo_loss

    def verl_init_model(self):
        self.loss_fn = partial(verl_ppo_loss, config=omega_conf_to_dataclass(self.config.actor))
        self.actor = TrainingWorker.__new__(TrainingWorker)
        self.actor.engine = cpu_lm_engine(tiny_qwen2())
        self.actor.set_loss_fn(self.loss_fn)

    monkeypatch.setattr(ActorRolloutRefWorker, "init_model", verl_init_model)
    worker = worker_cls.__new__(worker_cls)  # Worker.__init__ needs a torch.distributed environment
    worker.config, worker.role = config.actor_rollout_ref, "actor_rollout"
    worker._is_actor, worker.distillation_enabled = True, False
    worker.init_model()
    return worker


@pytest.mark.parametrize("mode,hybrid_engine", [
    ("sync", True), ("colocate_async", True), ("separate_async", True), ("separate_async", False),
])
def test_erc_actor_worker_is_the_worker_verl_chose_plus_erc(mode, hybrid_engine, monkeypatch):
    from verl.single_controller.base.decorator import MAGIC_ATTR

    from erc_verl.seams.actor_loss import ppo_loss_with_entropy

    config, stock, ours = _worker_mappings(mode, hybrid_engine)
    assert stock.keys() == ours.keys()
    actor_roles = [role for role in stock if role.name in ("Actor", "ActorRollout", "ActorRolloutRef")]
    assert len(actor_roles) == 1
    for role, verl_remote in stock.items():
        verl_worker, erc_worker = verl_remote.__ray_actor_class__, ours[role].__ray_actor_class__
        if role not in actor_roles:
            assert erc_worker is verl_worker  # ref-only and critic workers stay verl's
            continue
        assert issubclass(erc_worker, verl_worker), (erc_worker.__mro__, verl_worker)
        public = {name for name in dir(verl_worker) if not name.startswith("_")}
        assert not public - set(dir(erc_worker)), public - set(dir(erc_worker))
        # verl's worker group binds every @register method, with the dispatch attributes found on it
        for name in public:
            attrs = getattr(getattr(verl_worker, name), MAGIC_ATTR, None)
            assert getattr(getattr(erc_worker, name), MAGIC_ATTR, None) == attrs, name

        worker = _init_model_with_verl_init_stubbed(erc_worker, config, monkeypatch)
        assert worker.loss_fn.func is ppo_loss_with_entropy and worker.actor.loss_fn is worker.loss_fn
        assert "prepare_model_outputs" in vars(worker.actor.engine)  # the detached-entropy seam is installed


def test_erc_actor_worker_leaves_non_erc_losses_to_verl(monkeypatch):
    from verl.trainer.ppo.utils import Role
    from verl.workers.utils.losses import ppo_loss as verl_ppo_loss

    from erc_verl.seams.trainer import use_erc_actor_workers

    config, _, mapping = _worker_mappings("separate_async", True, loss_mode="vanilla")
    use_erc_actor_workers(mapping)  # the trainers call it only for ERC losses; the worker checks again
    remote = mapping[Role.ActorRolloutRef]
    worker = _init_model_with_verl_init_stubbed(remote.__ray_actor_class__, config, monkeypatch)
    assert worker.loss_fn.func is verl_ppo_loss and worker.actor.loss_fn is worker.loss_fn
    assert "prepare_model_outputs" not in vars(worker.actor.engine)


@pytest.mark.parametrize("loss_mode", ["vanilla", "gppo"])
def test_positive_nll_term_puts_the_plugin_loss_in_front_of_a_baseline(loss_mode, monkeypatch):
    """A baseline with positive_nll_coeff > 0 gets the plugin's actor loss (which adds the term) but not the
    ERC entropy seam; with 0 our trainer leaves verl's workers, and so verl's loss, as they are."""
    from verl.trainer.ppo.utils import Role

    from erc_verl.seams.actor_loss import ppo_loss_with_entropy
    from erc_verl.seams.trainer import plugin_actor_loss_enabled
    from erc_verl.seams.workers import ERCActorWorkerMixin

    config, stock, ours = _worker_mappings("sync", True, loss_mode, "actor_rollout_ref.actor.positive_nll_coeff=0.1")
    assert plugin_actor_loss_enabled(config)
    erc_worker = ours[Role.ActorRolloutRef].__ray_actor_class__
    assert issubclass(erc_worker, ERCActorWorkerMixin)
    assert issubclass(erc_worker, stock[Role.ActorRolloutRef].__ray_actor_class__)
    worker = _init_model_with_verl_init_stubbed(erc_worker, config, monkeypatch)
    assert worker.loss_fn.func is ppo_loss_with_entropy and worker.actor.loss_fn is worker.loss_fn
    assert worker.loss_fn.keywords["config"].positive_nll_coeff == 0.1
    assert "prepare_model_outputs" not in vars(worker.actor.engine)

    config, stock, ours = _worker_mappings("sync", True, loss_mode)
    assert not plugin_actor_loss_enabled(config)
    assert {r: w.__ray_actor_class__ for r, w in ours.items()} == {r: w.__ray_actor_class__ for r, w in stock.items()}


def test_v0_resumed_at_the_last_step_trains_nothing(monkeypatch):
    """verl 0.9.1's V0 fit trains one step past total_training_steps when resumed from the final checkpoint
    (seen end to end: resumed at global_step_3 of 3, it trained and saved step 4). The ERC trainer, which V0 runs
    of erc_verl.main_ppo use whatever the loss, stops right after loading that checkpoint."""
    import inspect

    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    from erc_verl.seams.trainer import TrainingComplete

    fit = inspect.getsource(RayPPOTrainer.fit)  # where the override takes effect, in the verl version installed
    assert fit.index("self._load_checkpoint()") < fit.index("self.global_steps += 1") < fit.index("for epoch in range")
    trainer = ERCRayPPOTrainer.__new__(ERCRayPPOTrainer)
    trainer.total_training_steps, trainer.train_dataloader = 3, [None] * 4  # 4 steps an epoch: no boundary at 2
    for resumed_at, complete in ((2, False), (3, True), (5, True)):
        monkeypatch.setattr(RayPPOTrainer, "_load_checkpoint", lambda self, step=resumed_at: setattr(self, "global_steps", step))
        if complete:
            with pytest.raises(TrainingComplete, match=f"resumed at global step {resumed_at} of trainer.total_training_steps=3"):
                trainer._load_checkpoint()
        else:
            trainer._load_checkpoint()
    monkeypatch.setattr(RayPPOTrainer, "fit", lambda self: self._load_checkpoint())
    assert trainer.fit() is None  # the run ends cleanly, with a line saying why


def test_v0_resumed_at_an_epoch_boundary_draws_the_next_epoch(tmp_path):
    """verl 0.9.1's V0 skips the saved data-loader state at an epoch boundary, and its sampler, seeded afresh, then
    replays epoch 1's order (seen end to end: step 3 trained step 1's prompts). The ERC trainer restores that state
    and closes the finished epoch, so the next pass is the epoch an uninterrupted run draws. Real torchdata loader
    and verl's own sampler."""
    import inspect

    from omegaconf import OmegaConf
    from torchdata.stateful_dataloader import StatefulDataLoader
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.trainer.ppo.utils import create_rl_sampler

    assert "at_epoch_boundary" in inspect.getsource(RayPPOTrainer._load_checkpoint)  # what the override mends
    data = list(range(16))

    def loader():
        sampler = create_rl_sampler(OmegaConf.create({"shuffle": True, "seed": 1}), data)
        return StatefulDataLoader(data, batch_size=8, sampler=sampler, drop_last=True)

    uninterrupted, checkpoint = [], tmp_path / "global_step_2"
    checkpoint.mkdir()
    reference = loader()
    for epoch in range(2):
        for batch in reference:  # as V0's fit iterates, saving after the epoch's last step
            uninterrupted.append(batch.tolist())
            if len(uninterrupted) == 2:
                torch.save(reference.state_dict(), checkpoint / "data.pt")
    assert uninterrupted[2:] != uninterrupted[:2]

    trainer = ERCRayPPOTrainer.__new__(ERCRayPPOTrainer)
    trainer.config = OmegaConf.create({"trainer": {"resume_mode": "auto", "default_local_dir": str(tmp_path)}})
    trainer.global_steps, trainer.train_dataloader = 2, loader()
    assert [b.tolist() for b in trainer.train_dataloader] == uninterrupted[:2]  # verl's "from scratch": a replay
    trainer.train_dataloader = loader()
    trainer._continue_data_after_finished_epoch()
    assert [b.tolist() for b in trainer.train_dataloader] == uninterrupted[2:]
