"""RL post-training: the objectives' clipping and KL rules, groups that are what the served
search returns, updates that move the policy toward the reward, and the alignment rows."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import SMALL_MODEL

from onerec.align import (
    Aligner,
    UserStates,
    align_artifacts,
    aligned_path,
    dpo_loss,
    ecpo_objective,
    path_kl,
    ppo_objective,
    pscores,
    sid_logits,
    sid_logp,
)
from onerec.align_config import AlignConfig
from onerec.align_eval import KEPT, keep_head
from onerec.align_report import merge
from onerec.align_sampling import OpenTrie, first_items, legal_fraction, sample_group
from onerec.cli import main
from onerec.data.synthetic import SyntheticConfig, generate
from onerec.embeddings import item_embeddings
from onerec.experiment import load_checkpoint, load_item_tables, validation_split
from onerec.model import TorchSearch
from onerec.reward import fit_reward
from onerec.runtime.beam_search import constrained_beam_search
from onerec.runtime.catalog import collision_ranks
from onerec.runtime.sid_index import SIDIndex
from onerec.tokenizer import SemanticTokenizer, TokenizerConfig
from onerec.train import ItemTables, build_model, model_config
from onerec.train_config import RewardConfig

TINY = AlignConfig(users_per_step=16, group=8, inner_steps=2, lr=3e-3, ntp_weight=0.0, threads=1)


@pytest.fixture(scope="module")
def setup():
    ds = generate(SyntheticConfig(n_users=60, n_items=200, max_history=300, min_history=10, seed=3))
    _, emb = item_embeddings(ds.item_content, ds.user_index(), ds.item_index(), 8, 8)
    _, codes, _ = SemanticTokenizer.fit(emb, TokenizerConfig(codebook_size=8), progress=False)
    tables = ItemTables.build(ds, emb, codes)
    popularity = np.bincount(ds.item_index(), minlength=ds.n_items)
    index = SIDIndex.build(codes, collision_ranks(codes, popularity), 8)
    cfg = model_config(ds, tables, 8, **SMALL_MODEL)
    torch.manual_seed(0)
    model = build_model(cfg, tables).eval()
    states = UserStates(ds, tables, index, cfg, validation_split(ds))
    return ds, tables, index, model, states


class ItemReward:
    """A stand-in reward model: a fixed score per item token, the same for every user."""

    cfg = SimpleNamespace(short_len=20)

    def __init__(self, n_items: int) -> None:
        self.value = torch.from_numpy(np.random.default_rng(0).random(n_items + 2)).float()

    def scores(self, static, short, pos, tokens):
        return None, self.value[tokens]


def _aligner(setup, reward=None) -> Aligner:
    ds, _, index, model, states = setup
    policy = copy.deepcopy(model)
    return Aligner(
        policy, model, reward or ItemReward(ds.n_items), states, index, None, np.zeros(0, int)
    )


def test_ecpo_bounds_a_negative_advantages_ratio_by_one_plus_delta_before_the_clip() -> None:
    logp = torch.tensor([np.log(3.0), np.log(3.0), np.log(0.5)], requires_grad=True)
    old, mask = torch.zeros(3), torch.ones(3)
    adv = torch.tensor([-1.0, 1.0, -1.0])
    loss, clip = ecpo_objective(logp, old, adv, eps=0.2, delta=0.1, mask=mask)
    loss.backward()
    # ratio 3, advantage -1: bounded to 1.1 (inside the clip), gradient kept at that scale;
    # ratio 3, advantage +1: PPO's clip at 1.2, no gradient; ratio 0.5, advantage -1: clip
    # at 0.8, no gradient.
    assert loss.item() == pytest.approx((1.1 - 1.2 + 0.8) / 3, abs=1e-6)
    np.testing.assert_allclose(logp.grad.numpy(), [1.1 / 3, 0.0, 0.0], atol=1e-6)
    assert clip.item() == pytest.approx(2 / 3)
    logp.grad = None
    ppo, _ = ppo_objective(logp, old, adv, 0.2, mask)
    ppo.backward()  # plain PPO: the negative advantage's ratio of 3 is unbounded
    assert ppo.item() == pytest.approx((3.0 - 1.2 + 0.8) / 3, abs=1e-6)
    np.testing.assert_allclose(logp.grad.numpy(), [1.0, 0.0, 0.0], atol=1e-6)


def test_groups_are_the_served_beams_legal_and_never_seen(setup) -> None:
    _, tables, index, model, states = setup
    rows = np.arange(12)
    inputs, exclude = states.inputs(rows), states.exclude(rows)
    rng = np.random.default_rng(0)
    for search in ("beam", "sample"):
        sids, valid = sample_group(model, inputs, index.trie, 8, exclude, search, rng)
        assert valid.mean() > 0.9
        assert legal_fraction(sids, valid, index.trie) == 1.0
        leaves = index.trie.leaf_of(sids[valid])
        owner = np.nonzero(valid)[0]
        assert not any(leaf in exclude[r] for r, leaf in zip(owner, leaves, strict=True))
        items = first_items(index, sids, valid)
        assert (items[valid] >= 0).all() and (items[~valid] == -1).all()
        np.testing.assert_array_equal(tables.sids[items[valid]], sids[valid])
    # Without the trie, a random model's beams mostly miss the catalog's 200 of 512 SIDs.
    open_trie = OpenTrie(index.trie.levels, 8)
    memory, keep = model.encoder(**inputs)
    search = TorchSearch(model.decoder, keep, model.decoder.cross_kv(memory))
    free = constrained_beam_search(search, len(rows), 16, open_trie)
    assert 0.0 < legal_fraction(free.sids, free.valid, index.trie) < 1.0


def test_the_teacher_forced_log_probability_is_the_beam_score(setup) -> None:
    _, _, index, model, states = setup
    inputs = states.inputs(np.arange(6))
    with torch.no_grad():
        memory, keep = model.encoder(**inputs)
        search = TorchSearch(model.decoder, keep, model.decoder.cross_kv(memory))
        result = constrained_beam_search(search, 6, 8, index.trie)
        sids = torch.from_numpy(np.maximum(result.sids, 0))
        logp = sid_logp(sid_logits(model, inputs, sids), sids).numpy()
    np.testing.assert_allclose(logp[result.valid], result.scores[result.valid], atol=1e-4)


def test_the_kl_to_an_identical_reference_is_zero(setup) -> None:
    _, _, index, model, states = setup
    inputs = states.inputs(np.arange(6))
    sids, _ = sample_group(
        model, inputs, index.trie, 8, states.exclude(np.arange(6)), "beam", np.random.default_rng(0)
    )
    sids = torch.from_numpy(np.maximum(sids, 0))
    with torch.no_grad():
        same = path_kl(
            sid_logits(model, inputs, sids), sid_logits(copy.deepcopy(model), inputs, sids)
        )
    assert same.abs().max().item() < 1e-6


@pytest.mark.parametrize("method", ["ecpo", "grpo"])
def test_group_updates_raise_the_reward_of_the_served_beams(setup, method) -> None:
    aligner = _aligner(setup)
    index, states = aligner.index, aligner.states
    rows = np.arange(16)
    inputs, exclude = states.inputs(rows), states.exclude(rows)

    def served_reward() -> float:
        sids, valid = sample_group(
            aligner.policy, inputs, index.trie, 8, exclude, "beam", np.random.default_rng(0)
        )
        return pscores(aligner.reward, inputs, first_items(index, sids, valid))[valid].mean()

    before = served_reward()
    cfg = replace(TINY, method=method)
    opt = torch.optim.AdamW(aligner.policy.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(0)
    logs = [aligner.step(rows, cfg, opt, rng) for _ in range(6)]
    assert served_reward() > before + 0.05
    assert logs[-1]["kl"] > 0 and 0 <= logs[-1]["clip_fraction"] <= 1


def test_dpo_moves_the_chosen_sid_up_against_the_rejected(setup) -> None:
    aligner = _aligner(setup)
    rows = np.arange(16)
    inputs = aligner.states.inputs(rows)
    sids, valid = sample_group(
        aligner.policy,
        inputs,
        aligner.index.trie,
        8,
        aligner.states.exclude(rows),
        "beam",
        np.random.default_rng(0),
    )
    reward = pscores(aligner.reward, inputs, first_items(aligner.index, sids, valid))
    sids = torch.from_numpy(np.maximum(sids, 0))
    chosen = reward.masked_fill(~torch.from_numpy(valid), -np.inf).argmax(1, keepdim=True)
    rejected = reward.masked_fill(~torch.from_numpy(valid), np.inf).argmin(1, keepdim=True)

    def margin() -> float:
        with torch.no_grad():
            logp = sid_logp(sid_logits(aligner.policy, inputs, sids), sids)
        return (logp.gather(1, chosen) - logp.gather(1, rejected)).mean().item()

    before = margin()
    with torch.no_grad():
        ref = sid_logp(sid_logits(aligner.reference, inputs, sids), sids)
    assert dpo_loss(ref, ref, reward, torch.from_numpy(valid), 0.5).item() == pytest.approx(
        np.log(2.0), abs=1e-6
    )
    opt = torch.optim.AdamW(aligner.policy.parameters(), lr=3e-3)
    for _ in range(3):
        loss = dpo_loss(
            sid_logp(sid_logits(aligner.policy, inputs, sids), sids),
            ref,
            reward,
            torch.from_numpy(valid),
            0.5,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert margin() > before + 0.1


def test_align_then_align_eval_on_a_tiny_artefact(tmp_path) -> None:
    art = tmp_path / "art"
    data = ["--users", "40", "--items", "300", "--max-history", "120", "--codebook-size", "8"]
    assert main(["build", "--out", str(art), "--until", "tokenizer", *data]) == 0
    ds, tables, _ = load_item_tables(art)
    cfg = model_config(ds, tables, 8, **SMALL_MODEL)
    torch.manual_seed(0)
    (art / "model").mkdir()
    state = {"model": build_model(cfg, tables).state_dict(), "model_config": asdict(cfg)}
    torch.save(state, art / "model" / "checkpoint.pt")
    fit_reward(art, RewardConfig(d=16, hidden=32, pos_len=8, epochs=2, events_per_epoch=5000))
    run = replace(TINY, steps=2, legal_users=8, legal_width=8, ntp_weight=0.5, ntp_batch=8)
    for method in ("ecpo", "grpo"):
        path, result = align_artifacts(art, replace(run, method=method))
        assert path == aligned_path(art, method) and path.with_suffix(".png").is_file()
        assert len(result["curves"]) == 2 and 0 <= result["legal_unconstrained_after"] <= 1
    argv = ["align", "--artifacts", str(art), "--method", "dpo", "--steps", "2", "--group", "4"]
    assert main(argv) == 0
    aligned = load_checkpoint(aligned_path(art, "dpo"), tables)
    assert aligned.cfg == cfg
    reports = tmp_path / "reports"
    argv = ["align-eval", "--artifacts", str(art), "--reports", str(reports), "--beam-width", "16"]
    assert main(argv) == 0
    section = json.loads((reports / "align.json").read_text())["datasets"]["art"]
    assert (reports / "align_curves_art.png").is_file()
    models = section["models"]
    expected = ["random", "popularity", "ntp", "ntp+reward", "ecpo", "grpo", "dpo"]
    assert list(models) == [*expected, "best+reward", "oracle"]
    oracle = models["oracle"]["engagement"]
    assert all(m["engagement"] <= oracle + 1e-9 for m in models.values())
    assert models["ntp"]["gap_closed"] == 0.0 and models["oracle"]["gap_closed"] == 1.0
    assert models["ntp"]["legal_unconstrained"] is not None
    assert models["oracle"]["legal_unconstrained"] is None
    diagnostics = section["diagnostics"]
    assert diagnostics["pscore-catalog"]["engagement"] <= oracle + 1e-9
    # The recall-kept bound: more of the served head kept, less engagement, never below ntp
    bound = [diagnostics[f"ntp@{m}+oracle"] for m in KEPT]
    engagement = [b["engagement"] for b in bound]
    assert engagement == sorted(engagement, reverse=True)
    assert models["ntp"]["engagement"] - 1e-9 <= engagement[-1] <= oracle + 1e-9
    assert set(section["se_vs_ntp"]) == set(models) - {"ntp"} | set(diagnostics)
    fitted = (art / "model" / "reward_blend.json").read_text()
    # Graded at a given blend (a build's served one): nothing fitted, nothing overwritten.
    assert main([*argv, "--blend", "7.5", "--name", "served"]) == 0
    served = json.loads((reports / "align.json").read_text())["datasets"]["served"]
    assert served["blend"] == 7.5 and served["blend_objective"] == {}
    assert (art / "model" / "reward_blend.json").read_text() == fitted


def test_keep_head_keeps_the_first_items_and_fills_without_repeats() -> None:
    head = np.array([[5, 7, 9, -1, -1, -1, -1, -1, -1, -1], [-1] * 10])
    fill = np.array([[7, 1, 2, 3, 4, 6, 8, 10, 11, 12, 13, 14], [3, 4, -1, 5] + [-1] * 8])
    lists = keep_head(head, fill, 2)
    assert lists[0].tolist() == [5, 7, 1, 2, 3, 4, 6, 8, 10, 11]
    assert lists[1].tolist() == [3, 4, 5] + [-1] * 7


def test_the_report_shows_rows_ablations_and_paired_errors(tmp_path) -> None:
    row = {"engagement": 0.5, "gap_closed": 0.2, "recall@10": 0.1, "ndcg@10": 0.05}
    section = {
        "models": {"ntp": row | {"legal_unconstrained": 0.9}, "ecpo": row},
        "ablations": {"ecpo-ntp0": row},
        "se_vs_ntp": {"ecpo": {"engagement": 0.01}, "ecpo-ntp0": {"engagement": 0.02}},
        "like_rate_among_hits": {"ntp": 0.4},
        "blend": 0.1,
    }
    merge(tmp_path, "synthetic", section)
    text = (tmp_path / "align.md").read_text()
    assert "| ecpo | 0.5000 ± 0.0100 |" in text and "| ecpo-ntp0 | 0.5000 ± 0.0200 |" in text
    assert "| ntp | 0.5000 | 0.2000 | 0.1000 | 0.0500 | 0.9000 | 0.400 |" in text
    assert '"blend": 0.1' in text
