"""Smoke tests of the benchmark command and its suites, at tiny sizes (seconds), and the
determinism check: the same seed gives the same accuracy numbers."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from benchmarks import __main__ as cli
from benchmarks.suites import multidigits, qm9, synthetic, toy

TWO = ["Equal", "MGDA-UB"]


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    # as the command does: tiny models on a shared machine run far faster on one thread
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _metrics(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def test_multidigits_tiny_and_deterministic(tmp_path: pathlib.Path) -> None:
    a = multidigits.run(
        strategies=TWO, seeds=[0], quick=True, tiny=True, out_dir=tmp_path, show_progress=False
    )
    b = multidigits.run(
        strategies=TWO, seeds=[0], quick=True, tiny=True, out_dir=tmp_path, show_progress=False
    )
    c = multidigits.run(
        strategies=TWO, seeds=[1], quick=True, tiny=True, out_dir=tmp_path, show_progress=False
    )
    assert [r["strategy"] for r in a["rows"]] == ["STL", *TWO]
    assert _metrics(a["rows"]) == _metrics(b["rows"])  # same seed: identical numbers
    assert [r["left/acc"] for r in a["rows"]] != [r["left/acc"] for r in c["rows"]]
    for r in a["rows"]:
        # the right digit's value is regressed: an MAE in digits (one epoch: any finite value)
        assert 0.0 <= r["left/acc"] <= 1.0 and 0.0 < r["right/mae"] < float("inf")
    assert "Δm%" in a["markdown"] and "MGDA-UB" in a["markdown"]
    assert (tmp_path / "multidigits_delta_m.png").stat().st_size > 1000
    json.dumps(a)


def test_multidigits_pairs_split_before_pairing() -> None:
    p = multidigits.make_problem(pairs_per_image=2)
    # 1797 digits, 20 % test: each split holds only its own digits, paired twice
    assert p.x_train.shape == (2 * 1438, 100) and p.x_test.shape == (2 * 359, 100)
    assert float(p.x_train.max()) <= 1.0 and float(p.x_train.min()) >= 0.0
    assert set(p.y_train.unique().tolist()) == set(range(10))
    # heterogeneous tasks: a 10-class classification and a regression of the partner's value
    assert [(t.loss, t.metric, t.out_dim) for t in p.tasks] == [
        ("ce", "acc", 10),
        ("mse", "mae", 1),
    ]


def test_toy_tiny_and_plot(tmp_path: pathlib.Path) -> None:
    res = toy.run(
        strategies=TWO, seeds=[0], quick=True, tiny=True, out_dir=tmp_path, show_progress=False
    )
    assert len(res["rows"]) == 2 * len(toy.INITS)
    assert (tmp_path / "toy_trajectories.png").stat().st_size > 1000
    json.dumps(res)


def test_toy_problem_values() -> None:
    import torch

    # at the task-1 minimum (7, −8.3552) L1 (unscaled) is near its lowest value, −20 + 0.1·0.35²/10
    x2 = -8.3552
    x = torch.tensor([7.0, x2], dtype=torch.float64)
    l1, _ = toy.toy_losses(x, scale=1.0).tolist()
    c2 = float(np.tanh(-x2 / 2))
    c1 = max(float(np.tanh(x2 / 2)), 0.0)
    f1_sq = (0.0 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    assert c1 == 0.0
    assert l1 == pytest.approx(f1_sq * c2)


def test_synthetic_tiny_and_scales(tmp_path: pathlib.Path) -> None:
    res = synthetic.run(
        strategies=TWO, seeds=[0], quick=True, tiny=True, out_dir=tmp_path, show_progress=False
    )
    assert {r["strategy"] for r in res["rows"]} == {"STL", *TWO}
    assert res["plots"] and (tmp_path / res["plots"][0]).exists()
    p = synthetic.make_problem(64, conflict=1.0, imbalance=2.0, n_train=500, n_test=100)
    assert p.m == 64
    std = p.y_train.std(0)
    # the loss scales s_t² span 10^ρ = 100 from the first task to the last
    assert float(std[-1] ** 2 / std[0] ** 2) == pytest.approx(100.0, rel=0.3)


QM9_HEADER = (
    "XYZ_file,Index,SMILES,InChi,N_atoms,Stoichiometry,Elements,XYZ_Ang,Mulliken_pop,"
    "Harmonic_Freq_cmi,RotA_GHz,RotB_GHz,RotC_GHz,Dipole_debye,Polarizability_bohr3,HOMO_au,"
    "LUMO_au,HOMO_LUMO_gap_au,R2_bohr2,ZPVE_au,InternalEnergy_0K_au,InternalEnergy_298K_au,"
    "Enthalphy_298K_au,GibbsFreeEnergy_298K_au,Heatcapacity_Cv_cal_mol_K"
)


def test_qm9_parser_on_fixture(tmp_path: pathlib.Path) -> None:
    # H2 at 0.74 Å (a made-up record in the qm9pack format), and a water-like O–H2 with *^
    rows = [
        '"a.xyz",1,"[H][H]","x",2,"[2,0,0,0,0]","[\'H\',\'H\']","[[0.,0.,0.],[0.74,0.,0.]]",'
        '"[0.,0.]","[4000.]",0.,0.,0.,0.,5.,-0.5,0.1,0.6,8.,0.01,-1.17,-1.16,-1.15,-1.18,3.',
        '"b.xyz",2,"O","x",3,"[2,0,0,1,0]","[\'O\',\'H\',\'H\']",'
        '"[[0.,0.,0.],[0.96,0.,0.],[-0.24,0.93,1.*^-3]]","[0.,0.,0.]","[1.]",1.,1.,1.,'
        "1.85,6.,-0.26,0.07,0.33,19.,0.02,-76.4,-76.39,-76.38,-76.41,6.",
    ]
    f = tmp_path / "qm9_part1.csv"
    f.write_text(QM9_HEADER + "\n" + "\n".join(rows) + "\n")
    x, y = qm9.parse_csv(f)
    assert x.shape == (2, 34) and y.shape == (2, 11)
    # element counts (H, C, N, O, F) are the last 5 features
    assert x[0, -5:].tolist() == [2, 0, 0, 0, 0] and x[1, -5:].tolist() == [2, 0, 0, 1, 0]
    # Coulomb matrix of H2: [[0.5, 1/r], [1/r, 0.5]] with r in bohr → eigenvalues 0.5 ± 1/r
    r = 0.74 * qm9.ANGSTROM_TO_BOHR
    assert x[0, :2] == pytest.approx([0.5 + 1 / r, 0.5 - 1 / r])
    assert np.all(x[0, 2:29] == 0)
    # targets: μ, α unchanged; HOMO in meV; U0 atomization = (U0 − 2·E_H) in meV
    assert y[0, 0] == 0.0 and y[1, 0] == pytest.approx(1.85)
    assert y[0, 2] == pytest.approx(-0.5 * qm9.HARTREE_TO_MEV)
    assert y[0, 6] == pytest.approx((-1.17 - 2 * -0.500273) * qm9.HARTREE_TO_MEV)
    assert y[1, 6] == pytest.approx((-76.4 - 2 * -0.500273 - -75.064579) * qm9.HARTREE_TO_MEV)


def test_qm9_skips_clearly_without_data(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> list[pathlib.Path]:
        raise qm9.MissingData("the qm9 suite needs the qm9pack wheel: pip install 'mtlbal[qm9]'")

    monkeypatch.setattr(qm9, "data_files", missing)
    res = qm9.run(strategies=TWO, seeds=[0], quick=True, show_progress=False)
    assert "qm9pack" in res["skipped"] and res["rows"] == []


def test_cli_runs_report_and_report_only(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "res"
    argv = [
        "multidigits",
        "synthetic",
        "--tiny",
        "--seeds",
        "0,1",
        "--strategies",
        "Equal,PCGrad",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    # a short summary: the overview and where the report is, not every table
    assert "PCGrad" in printed and "Δm%" in printed and str(out / "index.md") in printed
    assert len(printed.strip().splitlines()) <= 40 and "| strategy |" in printed
    assert "multidigits" in printed and "differ from Equal" in printed
    data = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in data["suites"]] == ["multidigits", "synthetic"]
    assert data["suites"][0]["stats"]["seeds"] == 2
    report = (out / "index.md").read_text()
    assert "Δp" in report and "Holm" in report and "## Choosing a balancer: what" in report
    assert "MR ↓" not in report and "mean rank" not in report.lower()  # no bare ranking
    assert "## Overview" in report and "| PCGrad | " in report
    # two seeds: a paired interval against Equal for PCGrad, in every accuracy table
    pc = next(r for r in data["suites"][0]["summary"] if r["strategy"] == "PCGrad")
    assert pc["vs_ref_low"] <= pc["vs_ref"] <= pc["vs_ref_high"]
    assert pc["verdict"] in ("better", "worse", "indistinguishable")
    assert f"{pc['vs_ref']:+.2f} [{pc['vs_ref_low']:+.2f}, {pc['vs_ref_high']:+.2f}]" in report
    (out / "index.md").unlink()
    assert cli.main(["quick", "--out", str(out), "--report-only"]) == 0
    assert (out / "index.md").read_text() == report
    # unknown suite and unknown strategy are clear errors
    with pytest.raises(SystemExit, match="unknown suite"):
        cli.main(["nosuchsuite", "--out", str(out)])
    with pytest.raises(KeyError, match="unknown strategy"):
        cli.main(["toy", "--strategies", "Nope", "--out", str(out)])


def test_report_only_without_results(tmp_path: pathlib.Path) -> None:
    assert cli.main(["--out", str(tmp_path / "empty"), "--report-only"]) == 2


def test_suite_discovery_and_quick_expansion() -> None:
    found = cli.discover()
    assert {"multidigits", "qm9", "toy", "synthetic"} <= set(found)
    names, quick = cli.expand(["quick"])
    assert quick and names[:2] == ["multidigits", "synthetic"]
    assert "qm9" not in names and "toy" not in names  # toy alone takes ~3.5 min (not in 5)
    names, quick = cli.expand(["all"])
    assert not quick and "qm9" in names
