"""Training: the loss falls, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SMALL_MODEL

from onerec.data.synthetic import SyntheticConfig, generate
from onerec.embeddings import item_embeddings
from onerec.model import OneRec
from onerec.tokenizer import SemanticTokenizer, TokenizerConfig
from onerec.train import (
    ItemTables,
    SampleSource,
    TrainConfig,
    _ranker_loss,
    _ranker_validation,
    build_model,
    model_config,
    ranker_windows,
    train,
    train_ranker,
)


@pytest.fixture(scope="module")
def setup():
    ds = generate(SyntheticConfig(n_users=60, n_items=200, max_history=400, min_history=10, seed=3))
    _, emb = item_embeddings(ds.item_content, ds.user_index(), ds.item_index(), 8, 8)
    _, codes, _ = SemanticTokenizer.fit(emb, TokenizerConfig(codebook_size=8), progress=False)
    item_tables = ItemTables.build(ds, emb, codes)
    cfg = model_config(ds, item_tables, 8, **SMALL_MODEL)
    return ds, item_tables, cfg


def _run(setup, epochs: int, **kwargs):
    ds, item_tables, cfg = setup
    torch.manual_seed(0)
    model = build_model(cfg, item_tables)
    source = SampleSource(ds, item_tables, cfg, samples_per_user=6, seed=0)
    tc = TrainConfig(epochs=epochs, batch_size=32, warmup_steps=5, threads=1, max_minutes=5)
    return model, source, train(model, source, tc, progress=False, **kwargs)


def test_samples_never_target_the_held_out_last_event(setup) -> None:
    ds, item_tables, cfg = setup
    source = SampleSource(ds, item_tables, cfg, samples_per_user=50, seed=0)
    lengths = np.diff(source.events.offsets)
    assert (source.cuts < lengths[source.users] - 1).all()
    assert (source.cuts >= 1).all()


def test_test_events_and_the_validation_event_before_them_are_never_trained_on(setup) -> None:
    """With ``test_events=3`` (``onerec build --test-events``) no SID target or ranker
    window target is one of a user's last four events; the fourth from last validates."""
    ds, item_tables, cfg = setup
    source = SampleSource(
        ds,
        item_tables,
        cfg,
        samples_per_user=50,
        seed=0,
        targets_per_sample=8,
        validation=True,
        test_events=3,
    )
    ev = source.events
    lengths = np.diff(ev.offsets)
    _, targets, _ = source.batch(np.arange(len(source)))
    for i, (u, cut) in enumerate(zip(source.users.tolist(), source.cuts.tolist(), strict=True)):
        n = int((targets[i, :, 0] >= 0).sum())
        assert n >= 1 and cut + n <= lengths[u] - 4
    bounds = list(zip(ev.offsets[:-1], ev.offsets[1:], strict=True))
    expected = np.concatenate([ev.items[lo + 1 : hi - 4] + 1 for lo, hi in bounds])
    windows = ranker_windows(source)
    real = (windows[:, :-1] > 0) & (windows[:, 1:] > 0)
    np.testing.assert_array_equal(np.sort(windows[:, 1:][real]), np.sort(expected))
    validation = _ranker_validation(source).numpy()
    np.testing.assert_array_equal(validation[:, -1], [ev.items[hi - 4] + 1 for _, hi in bounds])
    (_, val_targets), *_ = source.validation_batches(len(lengths))
    by_length = np.argsort(lengths, kind="stable")
    np.testing.assert_array_equal(
        val_targets[:, 0], item_tables.sids[ev.items[ev.offsets[by_length + 1] - 4]]
    )


def test_each_epoch_draws_fresh_cuts_from_the_same_users(setup) -> None:
    ds, item_tables, cfg = setup
    source = SampleSource(ds, item_tables, cfg, samples_per_user=3, seed=0)
    users, cuts = source.users.copy(), source.cuts.copy()
    lengths = np.diff(source.events.offsets)
    source.batches(32, np.random.default_rng(1))  # the next epoch
    np.testing.assert_array_equal(np.sort(source.users), np.sort(users))
    assert not np.array_equal(source.cuts, cuts)
    assert ((source.cuts >= 1) & (source.cuts < lengths[source.users] - 1)).all()
    pairs = source.users * lengths.max() + source.cuts
    assert len(np.unique(pairs)) == len(pairs)  # distinct cuts within a user


def test_multi_targets_are_the_next_items_and_stop_before_the_held_out_event(setup) -> None:
    ds, item_tables, cfg = setup
    source = SampleSource(ds, item_tables, cfg, samples_per_user=50, seed=0, targets_per_sample=4)
    idx = np.arange(len(source))
    _, targets, _ = source.batch(idx)
    assert targets.shape == (len(source), 4, item_tables.sids.shape[1])
    for i in idx:
        u, cut = int(source.users[i]), int(source.cuts[i])
        h = source.events.user(u)
        n = min(4, len(h) - 1 - cut)  # targets end before the held-out last event
        np.testing.assert_array_equal(targets[i, :n], item_tables.sids[h.items[cut : cut + n]])
        assert (targets[i, n:] == -1).all()


def test_next_item_windows_end_at_each_cut_with_the_first_target(setup) -> None:
    """Each window is the short-term pathway's items, oldest first, then the first target:
    the ranking stage trains on exactly what serving will hand it."""
    ds, item_tables, cfg = setup
    source = SampleSource(ds, item_tables, cfg, samples_per_user=50, seed=0)
    idx = np.arange(len(source))
    inputs, targets, recent = source.batch(idx)
    short = inputs["short_items"].numpy()
    np.testing.assert_array_equal(recent[:, :-1].flip(1)[:, : short.shape[1]], short)
    width = cfg.short_len + 1
    assert recent.shape == (len(source), width)
    for i in idx:
        u, cut = int(source.users[i]), int(source.cuts[i])
        items = source.events.user(u).items[max(0, cut + 1 - width) : cut + 1] + 1
        np.testing.assert_array_equal(recent[i, width - len(items) :], items)
        assert (recent[i, : width - len(items)] == 0).all()  # left-padded
    np.testing.assert_array_equal(item_tables.sids[recent[:, -1] - 1], targets[:, 0])


def test_ranker_windows_make_every_training_event_a_target_once(setup) -> None:
    """The ranking phase's epoch: each user's events after the first and before the held
    out ones are targets exactly once, in windows of consecutive events."""
    ds, item_tables, cfg = setup
    source = SampleSource(ds, item_tables, cfg, samples_per_user=1, seed=0, validation=True)
    ev = source.events
    bounds = zip(ev.offsets[:-1], ev.offsets[1:], strict=True)
    expected = np.concatenate([ev.items[lo + 1 : hi - 2] + 1 for lo, hi in bounds])
    first = ranker_windows(source)
    assert first.shape[1] == cfg.short_len + 1
    real = (first[:, :-1] > 0) & (first[:, 1:] > 0)
    np.testing.assert_array_equal(np.sort(first[:, 1:][real]), np.sort(expected))
    for window in first:  # consecutive events of one user, left-padded
        tokens = window[window > 0] - 1
        lo = np.flatnonzero(ev.items == tokens[0])
        assert any(np.array_equal(ev.items[i : i + len(tokens)], tokens) for i in lo)
        assert (window[: len(window) - len(tokens)] == 0).all()


def test_ranking_phase_trains_only_the_head_and_keeps_its_best_epoch(setup, monkeypatch) -> None:
    """After training the served table starts as the encoder's; the ranking phase then
    trains the head alone and keeps the epoch with the lowest validation next-item loss
    (scripted here: this tiny synthetic set has no sequential signal to learn)."""
    ds, item_tables, cfg = setup
    torch.manual_seed(0)
    model = build_model(cfg, item_tables)
    source = SampleSource(ds, item_tables, cfg, samples_per_user=6, seed=0, validation=True)
    tc = TrainConfig(epochs=1, batch_size=32, warmup_steps=5, threads=1, ranker_minutes=0.02)
    train(model, source, tc, progress=False)
    torch.testing.assert_close(model.next_item.items.weight, model.encoder.item.weight)
    sid_model = {k: v.clone() for k, v in model.state_dict().items() if "next_item" not in k}

    seen: list[dict[str, torch.Tensor]] = []

    def scripted(head, validation):
        assert len(validation) == ds.n_users  # one window per user, ending at its event
        seen.append({k: v.clone() for k, v in head.state_dict().items()})
        return {0: 5.0, 1: 4.0, 2: 3.0}.get(len(seen) - 1, 3.5)

    monkeypatch.setattr("onerec.train._ranker_loss", scripted)
    result = train_ranker(model, source, tc, progress=False)
    assert result["ranker_epochs"] >= 3 and not model.training
    assert (result["ranker_best_epoch"], result["ranker_validation_loss"]) == (2, 3.0)
    for name, value in model.next_item.state_dict().items():
        torch.testing.assert_close(value, seen[2][name], msg=name)
    assert not torch.equal(seen[-1]["items.weight"], seen[2]["items.weight"])
    for name, value in model.state_dict().items():
        if name in sid_model:
            torch.testing.assert_close(value, sid_model[name], msg=name)


def test_ranker_validation_loss_is_the_same_in_chunks(setup) -> None:
    """Chunking bounds the logits' memory; each window counts once, whatever the chunk."""
    ds, item_tables, cfg = setup
    source = SampleSource(ds, item_tables, cfg, samples_per_user=1, seed=0, validation=True)
    head = build_model(cfg, item_tables).next_item
    validation = _ranker_validation(source)
    assert len(validation) % 7 != 0  # a ragged last chunk
    with torch.no_grad():
        whole = head.eval().loss(head.items, validation, last=True).item()
    assert _ranker_loss(head, validation, chunk=7) == pytest.approx(whole, rel=1e-5)


def test_validation_holds_out_each_users_second_to_last_event(setup) -> None:
    ds, item_tables, cfg = setup
    source = SampleSource(
        ds, item_tables, cfg, samples_per_user=50, seed=0, targets_per_sample=4, validation=True
    )
    lengths = np.diff(source.events.offsets)
    _, targets, _ = source.batch(np.arange(len(source)))
    for i in range(len(source)):  # training targets stop before the validation event
        u, cut = int(source.users[i]), int(source.cuts[i])
        n = min(4, lengths[u] - 2 - cut)
        assert n >= 1
        assert (targets[i, n:] == -1).all()
    users = np.flatnonzero(lengths >= 3)
    users = users[np.argsort(lengths[users], kind="stable")]  # batched shortest first
    batches = source.validation_batches(batch_size=16)
    got = np.concatenate([t.numpy() for _, t in batches])
    assert got.shape == (len(users), 1, item_tables.sids.shape[1])
    items = source.events.items[source.events.offsets[users + 1] - 2]
    np.testing.assert_array_equal(got[:, 0], item_tables.sids[items])
    inputs, _ = batches[0]  # the history ends right before the validation event
    np.testing.assert_array_equal(
        inputs["short_items"][:, 0].numpy(),
        source.events.items[source.events.offsets[users[:16] + 1] - 3] + 1,
    )


def test_training_keeps_the_epoch_with_the_lowest_validation_loss(
    setup, tmp_path, monkeypatch
) -> None:
    ds, item_tables, cfg = setup
    seen: list[dict[str, torch.Tensor]] = []
    losses = iter([3.0, 1.0, 2.0])

    def scripted(model, batches):
        assert batches  # the validation events reach the check
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(losses)

    monkeypatch.setattr("onerec.train.validation_loss", scripted)
    torch.manual_seed(0)
    model = build_model(cfg, item_tables)
    source = SampleSource(ds, item_tables, cfg, samples_per_user=6, seed=0, validation=True)
    tc = TrainConfig(epochs=3, batch_size=32, warmup_steps=5, threads=1, max_minutes=5)
    ckpt = tmp_path / "ckpt.pt"
    result = train(model, source, tc, checkpoint=ckpt, progress=False)
    assert (result["best_epoch"], result["validation_loss"]) == (2, 1.0)
    final = model.state_dict()
    for name, value in seen[1].items():
        if name != "next_item.items.weight":  # the ranking stage's copy, made at the end
            torch.testing.assert_close(final[name], value, msg=name)
    torch.testing.assert_close(final["next_item.items.weight"], seen[1]["encoder.item.weight"])
    assert any(not torch.equal(final[k], v) for k, v in seen[2].items())
    state = torch.load(ckpt, weights_only=False)
    assert state["best"]["epoch"] == 2 and state["epoch"] == 3


def test_training_reports_each_objective_as_its_own_moving_average(setup, monkeypatch) -> None:
    """``"loss"`` is the SID loss alone, on the scale of the validation loss; the
    next-item objective, which training adds to it, is reported beside it."""
    seen: dict[str, list[float]] = {"sid": [], "next_item": []}
    real_losses = OneRec.losses

    def recording(self, *args):
        parts = real_losses(self, *args)
        for name, part in parts.items():
            seen[name].append(part.item())
        return parts

    monkeypatch.setattr(OneRec, "losses", recording)
    _, _, result = _run(setup, epochs=1)
    for name, key in (("sid", "loss"), ("next_item", "next_item_loss")):
        average = seen[name][0]
        for value in seen[name][1:]:
            average = 0.98 * average + 0.02 * value
        assert result[key] == pytest.approx(average), name
    assert len(seen["sid"]) == len(seen["next_item"]) > 1


def test_loss_falls_below_what_the_target_marginals_allow(setup) -> None:
    """Beating the per-level marginal entropy needs the user's pathways, not just priors.

    Measured on the last epoch's cuts, which the model met once (cuts are drawn afresh
    each epoch), so it takes enough epochs to learn rather than memorise."""
    model, source, _ = _run(setup, epochs=24)
    inputs, targets, _ = source.batch(np.arange(len(source)))
    targets = targets[:, 0]  # (B, L): the item right after each cut
    marginal = []
    for level in range(targets.shape[1]):
        p = np.bincount(targets[:, level].numpy()) / len(targets)
        p = p[p > 0]
        marginal.append(-(p * np.log(p)).sum())
    with torch.no_grad():
        loss = model.loss(inputs, targets).item()
    assert loss < np.mean(marginal) - 0.1, (loss, marginal)


def test_resume_continues_where_it_stopped(setup, tmp_path, monkeypatch) -> None:
    ckpt = tmp_path / "ckpt.pt"
    straight, _, _ = _run(setup, epochs=2)

    # Crash partway through epoch 2: only the epoch-1 checkpoint survives.
    calls = {"n": 0}
    real_batch = SampleSource.batch

    def crashing(self, idx):
        calls["n"] += 1
        if calls["n"] > len(self) // 32 + 3:
            raise KeyboardInterrupt
        return real_batch(self, idx)

    monkeypatch.setattr(SampleSource, "batch", crashing)
    with pytest.raises(KeyboardInterrupt):
        _run(setup, epochs=2, checkpoint=ckpt)
    monkeypatch.setattr(SampleSource, "batch", real_batch)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1

    # A new process rebuilds the model from scratch and resumes from the file.
    resumed, _, result = _run(setup, epochs=2, checkpoint=ckpt, resume=True)
    assert result["epochs"] == 2
    # Float rounding differs from run to run by up to ~2e-5 since the next-item objective's
    # large matmuls; a resume that replays other batches or negatives is off by far more.
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
