"""bench/paper_claim.py's claim rule: a variant is called better only where the two 95% Student-t
intervals separate, MS-SSIM is judged by its distance to the real set's, and one seed claims nothing.
RESULTS.md's statements of the paper's claims are this rule's output."""
from __future__ import annotations

import math

from bench import paper_claim


def runs(variant, swd, fid, msssim):
    return [{"variant": variant, "seed": i, "metrics": {"swd": s, "fid_efflite": f, "msssim": m}}
            for i, (s, f, m) in enumerate(zip(swd, fid, msssim))]


def line(lines, first, other):
    (hit,) = [x for x in lines if x.startswith(f"- {first} vs {other} ")]
    return hit


def test_interval_is_the_student_t_half_width():
    mean, half = paper_claim.interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert math.isclose(half, 4.303 * 1.0 / math.sqrt(3))
    assert math.isnan(paper_claim.interval([5.0])[1])


def test_claims_only_where_intervals_separate():
    results = (runs("aegan", [100, 101, 102], [300, 360, 240], [0.05, 0.06, 0.04])
               + runs("direct", [150, 151, 152], [310, 250, 370], [0.14, 0.15, 0.13])
               + runs("no_denoiser", [50, 51, 52], [200, 201, 202], [0.11, 0.12, 0.10]))
    lines = paper_claim.claims(results, msssim_real=0.12)
    vs_direct = line(lines, "aegan", "direct")
    assert "swd: **aegan better** (101 vs 151)" in vs_direct
    assert "fid_efflite: no difference measured" in vs_direct  # overlapping intervals
    # MS-SSIM is a distance to the real set's 0.12: direct's 0.14 beats aegan's 0.05, though the raw
    # values would read the other way ("more diverse, better").
    assert "MS-SSIM distance to real: **direct better**" in vs_direct
    assert "swd: **no_denoiser better**" in line(lines, "aegan", "no_denoiser")
    assert "swd: **no_denoiser better**" in line(lines, "no_denoiser", "direct")
    assert not any("no_finetune" in x for x in lines)  # a variant without runs is not compared


def test_one_seed_claims_nothing():
    results = runs("aegan", [100], [300], [0.3]) + runs("direct", [200], [400], [0.5])
    (only,) = paper_claim.claims(results, msssim_real=0.12)
    assert only.count("one seed, no interval") == 3
