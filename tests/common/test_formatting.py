import math

from core.common.formatting import fmt_bytes, fmt_kib, fmt_mib, fmt_pct, fmt_seconds, is_missing


def test_bytes_are_binary_units_labelled_as_such():
    assert fmt_bytes(1536) == "1.5 KiB"
    assert fmt_bytes(2 ** 20) == "1.00 MiB"
    assert fmt_bytes(200 * 2 ** 20) == "200.00 MiB"
    assert fmt_kib(1094451) == "1068.8 KiB"
    assert fmt_mib(674.24) == "674.2 MiB"


def test_percentages_and_durations():
    assert fmt_pct(0.3082) == "30.8 %" and fmt_pct(0.11178, 2) == "11.18 %"
    assert fmt_seconds(0.5) == "0.5 s" and fmt_seconds(0.00456) == "4.56 ms"
    assert is_missing(None) and is_missing(math.nan) and not is_missing(0.0)


def test_fmt_pct_never_rounds_a_part_to_nothing_or_to_the_whole():
    from core.common.formatting import fmt_pct

    assert fmt_pct(20 / 11_000_000) == "< 0.1 %"
    assert fmt_pct(0.0) == "0.0 %" and fmt_pct(1.0) == "100.0 %"
    assert fmt_pct(0.9999999) == "> 99.9 %" and fmt_pct(0.00001, 2) == "< 0.01 %"
    assert fmt_pct(0.3082) == "30.8 %" and fmt_pct(0.0005) == "0.1 %"  # 0.05 % rounds up to a shown 0.1
