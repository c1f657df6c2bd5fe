"""N per layer under a density budget: the config's map, the exact choice, what sparsify_ applies, round trips."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import actsparse
from actsparse import SparsityConfig, allocate, sparsify_, unsparsify_
from actsparse.amber.allocation import OBJECTIVES, choose_n, default_choices, density_of
from actsparse.amber.sensitivity import measure_curves, measure_fisher_curves, measure_loss_terms
from actsparse.calibration.layerwise import CalibrationOptions, calibrate_
from actsparse.calibration.state import load_state_, save_state
from actsparse.config import SENSITIVITIES
from actsparse.core.patterns import NM
from actsparse.errors import ActsparseError
from actsparse.eval.run import EvalSettings, Evaluator
from actsparse.models.discovery import LinearSite, find_linear_sites
from actsparse.sparsify import sparse_layers
from actsparse.sweep import Store, parse_sweep, run_sweep
from actsparse.sweep.recipe import RecipeSearch, search_recipe
from conftest import VOCAB, save_tiny_model_dir, tiny_model, vocab_text

torch.set_num_threads(1)
IDS = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(3))
WINDOWS = torch.randint(0, VOCAB, (3, 32), generator=torch.Generator().manual_seed(4))
MIXED = {"q@0": "4:16", "k@0": "12:16", "down@0": "6:16", "gate@1": "10:16", "v@1": "dense", "up@1": "14:16"}


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _kept_per_group(layer, x: torch.Tensor) -> set[int]:
    keep = layer.keep(x.reshape(-1, layer.in_features))
    return set(keep.reshape(keep.shape[0], -1, layer.pattern.m).sum(-1).unique().tolist())


def _inputs(model) -> dict[str, torch.Tensor]:
    """The input each sparse layer sees on IDS (recorded by hooks)."""
    seen, handles = {}, []
    for name, layer in sparse_layers(model).items():
        handles.append(layer.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0].detach())))
    _logits(model)
    for handle in handles:
        handle.remove()
    return seen


# ---- the config ------------------------------------------------------------------------------


def test_config_holds_a_sorted_map_and_round_trips_through_json():
    config = SparsityConfig(pattern="8:16", criterion="amber", allocation=MIXED)
    assert config.allocation[0] == ("q@0", "4:16") and [k for k, _ in config.allocation][:2] == ["q@0", "k@0"]  # by layer, role
    data = json.loads(json.dumps(config.to_dict()))
    assert data["allocation"] == MIXED
    assert SparsityConfig(**data) == config
    assert config.pattern_of("down", 0) == NM(6, 16) and config.pattern_of("down", 1) == NM(8, 16)
    assert "allocation" not in SparsityConfig(pattern="8:16").to_dict()  # uniform configs keep their old records and run keys
    assert SparsityConfig(pattern="8:16", allocation="sensitivity").to_dict()["allocation"] == "sensitivity"
    hash(config)  # frozen and hashable as before


@pytest.mark.parametrize(
    "pattern, allocation, message",
    [
        ("8:16", "greedy", "unknown allocation 'greedy'"),
        ("unstructured:0.5", "sensitivity", "needs an N:M pattern"),
        ("8:16", {"q0": "4:16"}, "cannot parse allocation key 'q0'"),
        ("8:16", {"query@0": "4:16"}, "unknown role 'query'"),
        ("8:16", {"q@0": "2:4"}, r"keeps the pattern's M \(16\)"),
        ("8:16", {"q@0": "17:16"}, "1 <= N < M"),
        ("8:16", {"q@0": "unstructured:0.5"}, "use N:16 or dense"),
        ("dense", {"q@0": "4:16"}, "needs an N:M pattern"),
        ("8:16", 5, "must be a string or a map"),
    ],
)
def test_bad_allocations_are_one_clear_error(pattern, allocation, message):
    with pytest.raises(ActsparseError, match=message):
        SparsityConfig(pattern=pattern, allocation=allocation)


def test_sparsify_refuses_an_unresolved_or_misnamed_allocation():
    model = tiny_model("llama")
    with pytest.raises(ActsparseError, match="not resolved yet.*actsparse.allocate"):
        sparsify_(model, SparsityConfig(pattern="8:16", allocation="sensitivity"))
    with pytest.raises(ActsparseError, match="allocation names q@7, which is not a selected"):
        sparsify_(model, SparsityConfig(pattern="8:16", allocation={"q@7": "4:16"}))
    with pytest.raises(ActsparseError, match="allocation names down@1, which is not a selected"):
        sparsify_(model, SparsityConfig(pattern="8:16", roles=("q",), allocation={"down@1": "4:16"}))
    assert not sparse_layers(model)


# ---- what sparsify_ applies -------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["magnitude", "wina", "amber", "amber-clamp", "var-weight", "random", "clact"])
@pytest.mark.parametrize("mitigation", ["none", "var", "dpts", "lowrank", "smooth-static"])
def test_each_layer_keeps_exactly_its_own_n(criterion, mitigation):
    model = tiny_model("llama")
    config = SparsityConfig(pattern="8:16", criterion=criterion, mitigation=mitigation, allocation=MIXED)
    stats = actsparse.collect_input_stats(model, WINDOWS, progress=False)
    sites = find_linear_sites(model)
    report = sparsify_(model, config, stats=stats)
    layers = sparse_layers(model)
    assert "model.layers.1.self_attn.v_proj" not in layers and len(layers) == 13  # the dense entry stays dense
    for site in sites:
        key = f"{site.role}@{site.layer}"
        if site.name in layers:
            assert layers[site.name].pattern == NM(*map(int, MIXED.get(key, "8:16").split(":")))
    for name, x in _inputs(model).items():
        assert _kept_per_group(layers[name], x) == {layers[name].pattern.n}, name
    out = _logits(model)
    assert torch.isfinite(out).all()
    flops = {s.name: s.flops_per_token for s in sites}
    kept = sum(flops[n] * (layers[n].pattern.density if n in layers else 1.0) for n in flops)
    assert report.density == pytest.approx(kept / sum(flops.values()), abs=1e-15)
    assert report.sparse_flop_fraction < 1.0 and report.to_dict()["layer_patterns"]["4:16"] == 1


def test_calibrated_mitigations_train_each_layer_at_its_own_n(tmp_path):
    for mitigation in ("spts", "oscale-shift"):
        model = tiny_model("llama")
        config = SparsityConfig(pattern="8:16", criterion="amber", mitigation=mitigation, allocation=MIXED)
        calibrate_(model, config, WINDOWS, options=CalibrationOptions(lr=1e-2), progress=False)
        layers = sparse_layers(model)
        assert layers["model.layers.0.self_attn.q_proj"].pattern == NM(4, 16)
        for name, x in _inputs(model).items():
            assert _kept_per_group(layers[name], x) == {layers[name].pattern.n}
        before = _logits(model)
        save_state(model, tmp_path / mitigation)
        fresh = tiny_model("llama")
        loaded = load_state_(fresh, tmp_path / mitigation)
        assert loaded.layer_patterns() == config.layer_patterns()
        assert {n: str(m.pattern) for n, m in sparse_layers(fresh).items()} == {n: str(m.pattern) for n, m in layers.items()}
        torch.testing.assert_close(_logits(fresh), before, atol=0, rtol=0)


def test_checkpoint_round_trip_keeps_every_layers_n(tmp_path):
    model = tiny_model("llama")
    sparsify_(model, SparsityConfig(pattern="8:16", criterion="amber", mitigation="lowrank", allocation=MIXED))
    before = _logits(model)
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert saved["sparsity"]["allocation"] == MIXED
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    patterns = {n: str(m.pattern) for n, m in sparse_layers(loaded).items()}
    assert patterns == {n: str(m.pattern) for n, m in sparse_layers(model).items()}
    assert patterns["model.layers.1.mlp.up_proj"] == "14:16"
    torch.testing.assert_close(_logits(loaded), before, atol=0, rtol=0)


# ---- the choice -------------------------------------------------------------------------------


def _site(name, k, n, layer=0, role="q"):
    return LinearSite(name=name, layer=layer, role=role, in_features=k, out_features=n)


def test_choice_meets_the_budget_exactly_and_is_the_cheapest():
    generator = torch.Generator().manual_seed(0)
    sites = [_site("a", 16, 16, 0, "q"), _site("b", 16, 32, 0, "k"), _site("c", 32, 32, 0, "v"), _site("d", 16, 48, 0, "o")]
    choices = [4, 8, 12]
    errors = {n: {s.name: (1 - n / 16) * (0.5 + torch.rand((), generator=generator).item()) for s in sites} for n in choices}
    costs = {n: {name: e**2 for name, e in by_name.items()} for n, by_name in errors.items()}  # e_q² as the eq objective
    picked, objective = choose_n(sites, costs, 16, 0.5)
    density, fraction = density_of(sites, picked, 16)
    assert density == 0.5 and fraction == 1.0
    best = None
    for combo in itertools.product(choices, repeat=len(sites)):  # brute force over every exact-budget choice
        n = {f"{s.role}@{s.layer}": c for s, c in zip(sites, combo)}
        if density_of(sites, n, 16)[0] == 0.5:
            cost = sum(costs[c][s.name] for s, c in zip(sites, combo))
            best = cost if best is None else min(best, cost)
    assert objective == pytest.approx(best, rel=1e-12)
    assert set(picked) == {"q@0", "k@0", "v@0", "o@0"}
    assert objective == pytest.approx(sum(costs[picked[f"{s.role}@0"]][s.name] for s in sites), rel=1e-12)


def test_an_unreachable_budget_gives_the_nearest_density_and_says_so():
    sites = [_site("a", 16, 16)]
    picked, _ = choose_n(sites, {4: {"a": 0.9}, 12: {"a": 0.1}}, 16, 0.5)  # 4/16 or 12/16, both 0.25 away: the one under
    assert picked == {"q@0": 4}
    two = [_site("a", 16, 16, 0, "q"), _site("b", 16, 48, 0, "o")]  # 1 and 3 units: 7/16 is the nearest to 0.45
    picked, _ = choose_n(two, {n: {"a": 1 - n / 16, "b": 1 - n / 16} for n in (4, 6, 8)}, 16, 0.45)
    assert density_of(two, picked, 16)[0] == pytest.approx(7 / 16, abs=1e-15)
    assert default_choices(16) == (4, 6, 8, 10, 12, 14, 16) and default_choices(4) == (1, 2, 3, 4)


def test_allocate_measures_curves_and_resolves_an_exact_map():
    model = tiny_model("llama")
    config = SparsityConfig(pattern="8:16", criterion="amber", mitigation="lowrank", allocation="sensitivity")
    resolved, allocation = allocate(model, config, WINDOWS, progress=False)
    assert resolved.resolved and resolved.allocation != config.allocation and allocation.met
    assert allocation.density == 0.5 and len(allocation.n) == 14
    assert len(set(allocation.n.values())) > 1  # mixed N
    assert allocation.objective <= allocation.uniform_objective + 1e-12  # uniform 8:16 is one of the feasible choices
    curves = allocation.settings["curves"]
    assert all(curves["4"][k] > curves["12"][k] for k in curves["4"])  # fewer kept, larger error
    report = sparsify_(model, resolved)
    assert report.density == 0.5
    unsparsify_(model)
    again, _ = allocate(model, config, WINDOWS, progress=False)
    assert again == resolved  # seeded, deterministic
    with pytest.raises(ActsparseError, match="average N 8 is outside the choices"):
        allocate(model, config, WINDOWS, choices=[10, 12], progress=False)
    fitted = SparsityConfig(pattern="8:16", criterion="amber", mitigation="oscale", allocation="sensitivity")
    assert allocate(model, fitted, WINDOWS, progress=False)[1].settings["mitigation"] == "none"  # nothing fitted yet


# ---- the loss-aware sensitivity (Fisher) ---------------------------------------------------------


def _hand_terms(model, windows, name, n, m, bos_id):
    """``Σ_t Σ_j g² d²`` and the token count for one layer, magnitude N:M, by hand: autograd on the
    layer's output, the error ``d`` = the dropped inputs through the weight, in float64."""
    layer = model.get_submodule(name)
    seen = {}

    def hook(module, args, out):
        out.retain_grad()
        seen["x"], seen["y"] = args[0].detach(), out

    handle = layer.register_forward_hook(hook)
    diagonal, rank_one, tokens = 0.0, 0.0, 0
    try:
        for window in windows:
            ids = window if bos_id is None else torch.cat([window.new_tensor([bos_id]), window])
            logits = model(ids.unsqueeze(0), use_cache=False).logits[0]
            loss = F.cross_entropy(logits[:-1], ids[1:], reduction="sum")
            loss.backward()
            x, g = seen["x"].double().reshape(-1, layer.in_features), seen["y"].grad.double().reshape(-1, layer.out_features)
            groups = x.abs().reshape(x.shape[0], -1, m)
            kept = torch.zeros_like(groups).scatter_(-1, groups.topk(n, dim=-1).indices, 1.0).reshape(x.shape)
            d = (x * (1 - kept)) @ layer.weight.double().T  # Y - Y' (the bias cancels)
            diagonal += (g.square() * d.square()).sum().item()
            rank_one += (g * d).sum(-1).square().sum().item()
            tokens += ids.numel() - 1
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    return diagonal, rank_one, tokens


@pytest.mark.parametrize("bos_id", [None, 1])
def test_loss_terms_equal_the_hand_computed_fisher_sums(bos_id):
    model = tiny_model("llama")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    terms, tokens = measure_loss_terms(
        model, WINDOWS[:2], ["4:16", "12:16"], "magnitude", names=names, bos_id=bos_id, progress=False
    )
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())
    for name in names:
        for n in (4, 12):
            diagonal, rank_one, count = _hand_terms(model, WINDOWS[:2], name, n, 16, bos_id)
            assert tokens == count == 2 * (32 if bos_id is not None else 31)
            assert terms[f"{n}:16"][name].diagonal == pytest.approx(diagonal, rel=1e-4)
            assert terms[f"{n}:16"][name].rank_one == pytest.approx(rank_one, rel=1e-4)
    fisher = measure_fisher_curves(model, WINDOWS[:2], ["4:16"], "magnitude", names=names, bos_id=bos_id, progress=False)
    assert fisher["4:16"].scores[names[1]] == pytest.approx(terms["4:16"][names[1]].diagonal / (2 * tokens), rel=1e-12)
    eq = measure_curves(model, WINDOWS[:2], ["4:16"], "magnitude", names=names, bos_id=bos_id, progress=False)["4:16"].scores
    t = terms["4:16"][names[0]]
    assert (t.error / t.reference) ** 0.5 == pytest.approx(eq[names[0]], rel=1e-6)  # the same error d as e_q's


def test_fisher_curves_fall_as_more_inputs_are_kept():
    model = tiny_model("llama")
    curves = measure_fisher_curves(model, WINDOWS, ["4:16", "8:16", "12:16"], "magnitude", progress=False)
    low, mid, high = (curves[p].scores for p in ("4:16", "8:16", "12:16"))
    assert sum(low.values()) > sum(mid.values()) > sum(high.values()) > 0
    falling = [name for name in low if low[name] >= mid[name] >= high[name]]
    assert len(falling) >= 0.9 * len(low)  # each layer's dropped inputs at 12:16 are among those dropped at 8:16 and 4:16


def test_the_objectives_are_the_configs_sensitivities_and_ride_in_the_config():
    assert tuple(OBJECTIVES) == SENSITIVITIES == ("fisher", "eq")
    assert SparsityConfig(pattern="8:16", allocation="sensitivity").sensitivity == "fisher"  # the default
    config = SparsityConfig(pattern="8:16", criterion="amber", allocation="sensitivity", sensitivity="eq")
    assert config.to_dict()["sensitivity"] == "eq" and SparsityConfig(**config.to_dict()) == config
    uniform = SparsityConfig(pattern="8:16", sensitivity="eq")  # nothing to choose: held as the default, left out of records
    assert uniform == SparsityConfig(pattern="8:16") and "sensitivity" not in uniform.to_dict()
    with pytest.raises(ActsparseError, match="unknown sensitivity 'hessian'"):
        SparsityConfig(pattern="8:16", allocation="sensitivity", sensitivity="hessian")
    chosen = SparsityConfig(pattern="8:16", allocation=MIXED, sensitivity="eq")  # a map keeps how it was chosen
    assert chosen.sensitivity == "eq" and chosen.to_dict()["sensitivity"] == "eq"


def test_fisher_allocation_meets_the_budget_and_costs_what_its_curves_say():
    model = tiny_model("llama")
    config = SparsityConfig(
        pattern="8:16", criterion="amber", mitigation="lowrank", allocation="sensitivity", sensitivity="fisher"
    )
    resolved, allocation = allocate(model, config, WINDOWS, progress=False)
    assert allocation.met and allocation.density == 0.5 and resolved.sensitivity == "fisher"
    assert allocation.settings["sensitivity"] == "fisher" and "Fisher" in allocation.settings["objective"]
    curves = allocation.settings["curves"]
    assert allocation.objective == pytest.approx(sum(curves[str(n)][k] for k, n in allocation.n.items() if n < 16), rel=1e-9)
    assert allocation.objective <= allocation.uniform_objective + 1e-15
    assert sparsify_(model, resolved).density == 0.5
    unsparsify_(model)


def test_fisher_spends_the_budget_where_the_loss_does_not_see_it_and_e_q_cannot():
    """Layer 1's MLP output scaled by 1e-3: e_q (relative, scale-free) sees the same layers, so its choice
    does not move; the Fisher estimate sees that their errors reach the loss 1e-3 times smaller and
    makes them as sparse as the choices allow, paying for it with denser layers elsewhere."""
    model = tiny_model("llama")
    config = SparsityConfig(pattern="8:16", criterion="magnitude", allocation="sensitivity", sensitivity="eq")
    _, before = allocate(model, config, WINDOWS, progress=False)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-3)
    _, eq = allocate(model, config, WINDOWS, progress=False)
    _, fisher = allocate(model, replace_sensitivity(config, "fisher"), WINDOWS, progress=False)
    mlp = ("gate@1", "up@1", "down@1")
    assert {k: eq.n[k] for k in mlp} == {k: before.n[k] for k in mlp}  # e_q is blind to the scale
    assert all(fisher.n[k] == 4 for k in mlp) and any(eq.n[k] > 4 for k in mlp)
    assert fisher.met and eq.met and fisher.n != eq.n


def replace_sensitivity(config, name):
    return SparsityConfig(**{**config.to_dict(), "sensitivity": name})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    widths=st.lists(st.sampled_from([(16, 16), (16, 32), (32, 16), (32, 48)]), min_size=1, max_size=5),
    costs=st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=15, max_size=15),
)
def test_any_nonnegative_costs_meet_a_feasible_budget_exactly(widths, costs):
    sites = [_site(f"s{i}", k, o, i, "q") for i, (k, o) in enumerate(widths)]
    table = {n: {s.name: costs[(3 * i + c) % 15] for i, s in enumerate(sites)} for c, n in enumerate((4, 8, 12))}
    picked, objective = choose_n(sites, table, 16, 0.5)  # uniform 8:16 is feasible, so the budget is met
    assert density_of(sites, picked, 16)[0] == 0.5
    assert objective <= sum(table[8].values()) + 1e-9
    chosen = [picked[f"q@{s.layer}"] for s in sites]
    assert objective == pytest.approx(sum(table[n][s.name] for s, n in zip(sites, chosen) if n < 16), abs=1e-9)


# ---- evaluation, sweeps and the recipe search ---------------------------------------------------


@pytest.fixture
def texts(tmp_path):
    paths = {}
    for name, seed in (("eval", 1), ("calib", 2), ("select", 3)):
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text(vocab_text(documents=8, seed=seed))
    return paths


def test_sweep_runs_sensitivity_allocations_and_resumes(tmp_path, texts):
    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    spec = parse_sweep(
        {
            "models": [str(model_dir)],
            "settings": {"data": str(texts["eval"]), "calib_data": str(texts["calib"]), "seqlen": 32, "calib_windows": 3},
            "grids": [
                {
                    "target": "activations",
                    "patterns": ["8:16"],
                    "criteria": ["amber"],
                    "mitigations": ["var"],
                    "allocations": ["uniform", "sensitivity"],
                }
            ],
        }  # fmt: skip
    )
    store = tmp_path / "store.jsonl"
    run_sweep(spec, store, progress=False)
    records = {r["run"]["config"].get("allocation", "uniform"): r for r in Store(store).records() if r["target"] != "dense"}
    sens = records["sensitivity"]
    assert isinstance(sens["config"]["allocation"], dict) and sens["density"] == 0.5 and sens["allocation"]["met"]
    assert sens["allocation"]["data"].endswith(str(texts["calib"])) and sens["allocation"]["settings"]["windows"] == 3
    assert records["uniform"]["density"] == 0.5 and "allocation" not in records["uniform"]["config"]
    assert run_sweep(spec, store, progress=False).skipped == 3  # resumes: nothing runs again
    # the record's config is enough to evaluate the same model again
    evaluator = Evaluator(EvalSettings(model=str(model_dir), data=str(texts["eval"]), seqlen=32), progress=False)
    again = evaluator.run(SparsityConfig(**sens["config"]))
    assert again["sparse_ppl"] == sens["sparse_ppl"]


def test_recipe_search_selects_on_selection_text_and_evaluates_the_winner(tmp_path, texts):
    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    settings = EvalSettings(
        model=str(model_dir), data=str(texts["eval"]), calib_data=str(texts["calib"]), seqlen=32, calib_windows=3
    )
    search = RecipeSearch(settings, "8:16", criteria=("magnitude", "amber"), mitigations=("none", "lowrank"),
                          select_data=str(texts["select"]), select_tokens=64)  # fmt: skip
    store = tmp_path / "recipe.jsonl"
    result = search_recipe(search, store, progress=False)
    candidates = result["candidates"]
    assert len(candidates) == 8 and all(c["data"].endswith(str(texts["select"])) for c in candidates)
    assert [c["sparse_ppl"] for c in candidates] == sorted(c["sparse_ppl"] for c in candidates)
    winner = result["winner"]
    assert winner["data"].endswith(str(texts["eval"])) and winner["config"] == candidates[0]["config"]
    assert winner["density"] == 0.5
    stored = len(Store(store).records())
    assert search_recipe(search, store, progress=False)["winner"]["key"] == winner["key"]
    assert len(Store(store).records()) == stored  # resumed: nothing ran twice
    with pytest.raises(ActsparseError):
        search_recipe(RecipeSearch(settings, "8:16", select_data=str(texts["eval"])), store, progress=False)


# ---- the command line -------------------------------------------------------------------------


def test_cli_eval_and_calibrate_with_allocations(tmp_path, texts, capsys):
    from actsparse.cli.main import main

    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    common = ["--model", str(model_dir), "--data", str(texts["eval"]), "--calib-data", str(texts["calib"]), "--seqlen", "32",
              "--calib-windows", "3", "--pattern", "8:16", "--criterion", "amber", "--no-progress"]  # fmt: skip
    assert main(["eval", *common, "--max-tokens", "96", "--allocation", "sensitivity", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert isinstance(record["config"]["allocation"], dict) and record["density"] == 0.5 and record["allocation"]["met"]
    saved = tmp_path / "record.json"
    saved.write_text(json.dumps(record))
    assert main(["eval", *common, "--max-tokens", "96", "--allocation", str(saved)]) == 0  # the record's map, measured no more
    out = capsys.readouterr().out
    assert "density    0.5000" in out and "allocation N per layer" not in out
    assert f"{record['sparse_ppl']:.3f}" in out
    assert main(["calibrate", *common, "--mitigation", "spts", "--allocation", "sensitivity", "--out", str(tmp_path / "st")]) == 0
    state = json.loads((tmp_path / "st" / "actsparse_state.json").read_text())
    assert isinstance(state["config"]["allocation"], dict)
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--data", str(texts["eval"]), "--seqlen", "32", "--max-tokens", "96",
                 "--state", str(tmp_path / "st"), "--allocation", "uniform", "--no-progress"]) == 2  # fmt: skip
    assert "--allocation 'uniform' given, but the state" in capsys.readouterr().err
    for bad, message in ((str(tmp_path / "missing.json"), "neither uniform, sensitivity nor an existing JSON file"),
                         ("greedy", "neither uniform")):  # fmt: skip
        assert main(["eval", *common, "--allocation", bad]) == 2
        assert message in capsys.readouterr().err
    assert main(["eval", *common, "--prune", "weights", "--allocation", "sensitivity"]) == 2
    assert "--allocation choose activation sparsity" in capsys.readouterr().err


def test_cli_eval_with_the_fisher_sensitivity(tmp_path, texts, capsys):
    from actsparse.cli.main import main

    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    common = ["--model", str(model_dir), "--data", str(texts["eval"]), "--calib-data", str(texts["calib"]), "--seqlen", "32",
              "--calib-windows", "3", "--pattern", "8:16", "--criterion", "amber", "--max-tokens", "96", "--no-progress"]  # fmt: skip
    assert main(["eval", *common, "--allocation", "sensitivity", "--sensitivity", "fisher", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["config"]["sensitivity"] == "fisher" and isinstance(record["config"]["allocation"], dict)
    assert record["allocation"]["settings"]["sensitivity"] == "fisher" and record["allocation"]["met"]
    assert main(["eval", *common, "--allocation", "sensitivity", "--sensitivity", "eq", "--json"]) == 0
    eq = json.loads(capsys.readouterr().out)
    assert eq["config"]["sensitivity"] == "eq" and eq["allocation"]["settings"]["sensitivity"] == "eq"
    assert eq["config"]["allocation"] != record["config"]["allocation"]
    assert main(["eval", *common, "--sensitivity", "fisher"]) == 2
    assert "--sensitivity chooses N per layer; give it with --allocation sensitivity" in capsys.readouterr().err
    assert main(["eval", *common, "--allocation", "sensitivity", "--sensitivity", "taylor"]) == 2
    assert main(["eval", *common, "--prune", "weights", "--sensitivity", "fisher"]) == 2
    assert "--sensitivity and --allocation choose activation sparsity" in capsys.readouterr().err
    evaluator = Evaluator(EvalSettings(model=str(model_dir), data=str(texts["eval"]), calib_data=str(texts["calib"]), seqlen=32,
                                       calib_windows=3, max_tokens=96), progress=False)  # fmt: skip
    config = SparsityConfig(pattern="8:16", criterion="amber", allocation="sensitivity", sensitivity="eq")
    by_eq, by_fisher = evaluator.allocate(config)[1], evaluator.allocate(replace_sensitivity(config, "fisher"))[1]
    assert by_eq["settings"]["sensitivity"] == "eq" and by_fisher["settings"]["sensitivity"] == "fisher"  # measured apart


def test_cli_recipe(tmp_path, texts, capsys):
    from actsparse.cli.main import main

    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    args = ["recipe", "--model", str(model_dir), "--data", str(texts["eval"]), "--calib-data", str(texts["calib"]),
            "--select-data", str(texts["select"]), "--select-tokens", "64", "--seqlen", "32", "--calib-windows", "3",
            "--max-tokens", "96", "--criteria", "amber", "--mitigations", "none,var", "--store", str(tmp_path / "r.jsonl"),
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count(" ppl ") >= 4 and "winner     amber + " in out and "density    0.5000" in out
    assert main([*args[:-1], "--select-data", str(texts["eval"])]) == 2  # selecting on the evaluation text is refused
    err = capsys.readouterr().err
    assert "overlap" in err or "share text" in err


def test_a_resumed_table_reuses_the_dense_perplexity_of_its_records(tmp_path, texts):
    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    settings = EvalSettings(model=str(model_dir), data=str(texts["eval"]), seqlen=32)
    record = Evaluator(settings, progress=False).run(SparsityConfig(pattern="8:16"))
    again = Evaluator(settings, progress=False)
    again.reuse_dense(record)
    assert (
        again.dense()[0].ppl == record["dense_ppl"]
        and again.run(SparsityConfig(pattern="8:16"))["sparse_ppl"] == record["sparse_ppl"]
    )
    other = Evaluator(EvalSettings(model=str(model_dir), data=str(texts["eval"]), seqlen=16), progress=False)
    with pytest.raises(ActsparseError, match="other settings"):
        other.reuse_dense(record)
