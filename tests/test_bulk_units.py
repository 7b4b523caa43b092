"""The bulk jobs' pieces without a service: Parquet appends that survive a kill at any byte,
JSONL repair, key sets, the duplicate check and the concurrency controller."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jv4_vllm.bulk.batch_file import output_key
from jv4_vllm.bulk.job import check_unique
from jv4_vllm.bulk.jsonl_out import JsonlAppender, repair_jsonl
from jv4_vllm.bulk.keys import KeySet, key_hash
from jv4_vllm.bulk.pacing import Pacer, PacingSettings
from jv4_vllm.bulk.parquet_out import ParquetAppender, repair_parquet
from jv4_vllm.bulk.rows import RowBuffer, schema_for
from jv4_vllm.bulk.thrift_compact import decode_struct, encode_struct

RNG = np.random.default_rng(0)
SCHEMA = schema_for(8, 4)


def rows(start: int, n: int) -> pa.Table:
    buffer = RowBuffer()
    for i in range(start, start + n):
        buffer.add(f"id-{i}", i % 3 or None, RNG.standard_normal(8).astype(np.float32),
                   RNG.standard_normal((1 + i % 5, 4)).astype(np.float32))
    return buffer.table(SCHEMA)


def test_row_groups_append_in_place_and_read_back(tmp_path: Path):
    path = tmp_path / "out.parquet"
    written = [rows(10 * k, 7 + k) for k in range(4)]
    appender = ParquetAppender(path, SCHEMA)
    for table in written[:2]:
        appender.append(table)
    appender.close()
    appender = ParquetAppender(path, SCHEMA)  # a second run appends to the same file
    for table in written[2:]:
        appender.append(table)
    appender.close()
    assert pq.read_table(path).equals(pa.concat_tables(written))
    assert not (tmp_path / "out.parquet.footer").exists()
    with pytest.raises(ValueError, match="other types"):
        ParquetAppender(path, schema_for(16, None))


def test_a_kill_at_any_byte_of_an_append_is_repaired(tmp_path: Path):
    """Every state the file passes through while a row group is written repairs to the rows before it
    (or, once the new footer is whole, to the rows with it)."""
    path = tmp_path / "out.parquet"
    before = [rows(0, 5), rows(5, 6)]
    appender = ParquetAppender(path, SCHEMA)
    for table in before:
        appender.append(table)
    old = path.read_bytes()
    appender.append(rows(11, 9))
    new = path.read_bytes()
    sidecar = (tmp_path / "out.parquet.footer").read_bytes()
    want_before = pa.concat_tables(before)
    cuts = sorted(set(range(len(old) - 64, len(new) + 1, 7)) | {len(new) - 1, len(new)})
    for cut in cuts:
        path.write_bytes(new[:cut] + old[cut:])  # overwritten in place up to the cut
        (tmp_path / "out.parquet.footer").write_bytes(sidecar)
        repair_parquet(path)
        table = pq.read_table(path)
        assert table.equals(want_before) or (cut == len(new) and table.num_rows == 20), cut
    with pytest.raises(ValueError, match="no out.parquet.footer"):
        path.write_bytes(new[:-10])
        (tmp_path / "out.parquet.footer").unlink(missing_ok=True)
        repair_parquet(path)


def test_thrift_round_trip_of_a_real_footer(tmp_path: Path):
    path = tmp_path / "x.parquet"
    pq.write_table(rows(0, 3), path)
    data = path.read_bytes()
    length = int.from_bytes(data[-8:-4], "little")
    footer = data[-8 - length:-8]
    assert encode_struct(decode_struct(footer)) == footer


def test_jsonl_repair_drops_a_cut_line_and_repeats(tmp_path: Path):
    path = tmp_path / "out.jsonl"
    out = JsonlAppender(str(path))
    for key in ("a", "b", "a", "c"):
        out.write(orjson.dumps({"custom_id": key, "response": None, "error": None}) + b"\n")
    out.write(b'{"custom_id": "d", "resp')  # a kill mid-line
    out.close()
    want = [key_hash(k) for k in ("a", "b", "c")]
    assert repair_jsonl(path, output_key).tolist() == want
    assert [orjson.loads(line)["custom_id"] for line in path.read_bytes().splitlines()] == ["a", "b", "c"]
    path.write_bytes(path.read_bytes() + b'{"custom_id": "e"')
    assert repair_jsonl(path, output_key).tolist() == want
    assert path.read_bytes().endswith(b"\n")


def test_key_sets_and_duplicates():
    keys = KeySet(key_hash(f"k{i}") for i in range(1000))
    assert key_hash("k7") in keys and key_hash("nope") not in keys and len(keys) == 1000
    check_unique(lambda: [("a", 1), ("b", 2)], "id")
    with pytest.raises(ValueError, match=r"'a' on lines 1, 3"):
        check_unique(lambda: [("a", 1), ("b", 2), ("a", 3)], "id")


async def test_pacer_grows_while_latency_holds_and_halves_on_overload():
    pacer = Pacer(PacingSettings(initial=4, maximum=32, backoff_s=0.01))
    for _ in range(40):
        await pacer.acquire()
        await pacer.done(0.01, 1)
    assert pacer.limit > 4
    grown = pacer.limit
    for _ in range(4):
        await pacer.acquire()
    started = time.monotonic()
    for _ in range(4):  # a storm: the answers of requests in flight together cut once
        await pacer.overloaded(0.2, 1)
    assert pacer.limit == pytest.approx(grown / 2)
    await pacer.acquire()
    assert time.monotonic() - started >= 0.19  # Retry-After held every sender back
    await pacer.done(0.01, 1)
    for _ in range(20):  # latency ten times the best: only queueing, so it shrinks
        await pacer.acquire()
        await pacer.done(0.1, 1)
    assert pacer.limit < grown / 2


async def test_pacer_never_exceeds_its_limit():
    pacer = Pacer(PacingSettings(initial=3, maximum=3))
    peak = 0

    async def one() -> None:
        nonlocal peak
        await pacer.acquire()
        peak = max(peak, pacer.in_flight)
        await asyncio.sleep(0.005)
        await pacer.done(0.005, 1)

    await asyncio.gather(*(one() for _ in range(30)))
    assert peak == 3 and pacer.in_flight == 0


async def test_pacer_settles_past_the_knee_of_a_batching_service():
    """A service that batches up to 8 requests at the same latency, then queues: the pacer reaches the
    knee (all the throughput there is) and does not run on to its maximum."""
    pacer = Pacer(PacingSettings(initial=1, maximum=64))
    for _ in range(400):
        await pacer.acquire()
        await pacer.done(0.01 * max(1.0, int(pacer.limit) / 8), 1)
    assert 8 <= pacer.limit <= 24


async def test_pacer_slow_start_reaches_the_knee_within_a_few_windows():
    """Doubling while latency holds: from 4 to a service's knee at 32 in well under a hundred answers
    (additive growth alone needs about twice as many), then it stops doubling once latency climbs."""
    pacer = Pacer(PacingSettings(initial=4, maximum=256))
    answers = 0
    while pacer.limit < 32 and answers < 1000:
        await pacer.acquire()
        await pacer.done(0.01 * max(1.0, int(pacer.limit) / 32), 1)
        answers += 1
    assert pacer.limit >= 32 and answers <= 4 + 8 + 16
    for _ in range(400):
        await pacer.acquire()
        await pacer.done(0.01 * max(1.0, int(pacer.limit) / 32), 1)
    assert 32 <= pacer.limit <= 96



async def test_pacer_gives_free_slots_to_requests_that_go_ahead():
    """Pages and images wait with ``ahead``: the next free slot is theirs, even if texts waited longer."""
    pacer = Pacer(PacingSettings(initial=1, minimum=1))
    await pacer.acquire()
    order: list[str] = []

    async def one(name: str, ahead: bool) -> None:
        await pacer.acquire(ahead=ahead)
        order.append(name)
        await pacer.done(0.01, 1)

    waiting = [asyncio.create_task(one("text-1", False)), asyncio.create_task(one("text-2", False))]
    await asyncio.sleep(0.01)
    waiting.append(asyncio.create_task(one("pages", True)))
    await asyncio.sleep(0.01)
    await pacer.done(0.01, 1)
    await asyncio.gather(*waiting)
    assert order[0] == "pages" and sorted(order[1:]) == ["text-1", "text-2"]


def test_embed_reads_pages_and_images_in_a_pass_of_their_own(tmp_path: Path):
    """The pass whose requests go ahead holds the PDFs and images; texts and unreadable rows the other."""
    from jv4_vllm.bulk import embed as embed_module
    from jv4_vllm.bulk.shard import Shard

    corpus = tmp_path / "corpus.jsonl"
    lines = [{"id": "t1", "text": "a"}, {"id": "d1", "pdf": "d.pdf"}, "not json", {"id": "t2", "text": "b"},
             {"id": "i1", "image": "i.png"}, {"id": "t3", "text": "c"}]
    corpus.write_bytes(b"".join((line.encode() if isinstance(line, str) else orjson.dumps(line)) + b"\n"
                                for line in lines))
    heavy, light = ([getattr(r, "id", "bad") for r in embed_module._rows_of(corpus, Shard(), kinds)]
                    for kinds in embed_module.PASSES)
    assert heavy == ["d1", "i1"] and light == ["t1", "bad", "t2", "t3"]
    request = embed_module._Request
    assert request([], [{"image": "x"}]).ahead and request([], [{"pdf": "x"}], (1, 2)).ahead
    assert not request([], [{"text": "x"}]).ahead
