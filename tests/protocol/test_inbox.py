"""The endpoint's inbox: a flood on one topic cannot bury other messages."""

from __future__ import annotations

from protocol.inbox import Inbox
from protocol.topics import Topics

T = Topics("inbox")


def test_state_topics_keep_their_newest_message_in_their_first_slot():
    inbox = Inbox(T)
    inbox.put(T.status("a"), b"a0", False)
    inbox.put(T.site("a", "chunks"), b"c0", False)
    for i in range(10_000):  # a status flood while the worker is busy
        inbox.put(T.status("b"), b"b%d" % i, False)
    inbox.put(T.site("a", "update"), b"m0", False)
    inbox.put(T.site("a", "update"), b"m1", True)
    inbox.put(T.status("a"), b"a1", False)
    assert len(inbox) == 4
    inbox.close()
    got = []
    while (item := inbox.get()) is not None:
        got.append(item)
    assert got == [
        (T.status("a"), b"a1", False),
        (T.site("a", "chunks"), b"c0", False),
        (T.status("b"), b"b9999", False),
        (T.site("a", "update"), b"m1", True),
    ]


def test_requests_are_bounded_and_the_rest_stays_in_order():
    inbox = Inbox(T, max_requests=5)
    for i in range(100):
        inbox.put(T.global_resend, b"r%d" % i, False)
        inbox.put(T.site("a", "chunks"), b"c%d" % i, False)
    items = [inbox.get() for _ in range(len(inbox))]
    requests = [p for t, p, _ in items if t == T.global_resend]
    chunks = [p for t, p, _ in items if t.endswith("/chunks")]
    assert requests == [b"r0", b"r1", b"r2", b"r3", b"r4"]
    assert chunks == [b"c%d" % i for i in range(100)]
    inbox.put(T.global_resend, b"later", False)  # room again once the worker took them
    assert inbox.get() == (T.global_resend, b"later", False)


def test_a_flooded_topic_is_named_in_a_warning(caplog):
    inbox = Inbox(T, flood_per_10s=50)
    for _ in range(200):
        inbox.put(T.status("x"), b"{}", False)
        inbox.put(T.site("x", "chunks"), b"c", False)  # chunks are a transfer, not a flood
    inbox._window -= 11  # (the 10 s window has passed)
    inbox.put(T.status("y"), b"{}", False)
    assert f"flood: 200 messages on {T.status('x')}" in caplog.text
    assert "chunks" not in caplog.text


def test_ordered_topics_stay_within_a_byte_budget_and_the_flooder_loses_its_own(caplog):
    """An insider's 8 MiB of evaluation reports or chunks while the worker is busy: its topic holds at
    most its budget (a message always fits an empty topic), the rest of it is dropped and counted in one
    warning; another site's messages still fit, and room comes back as the worker takes messages."""
    inbox = Inbox(T, max_topic_bytes=1000, max_chunk_topic_bytes=4000, max_bytes=6000)
    for _ in range(100):
        inbox.put(T.site("evil", "eval"), b"e" * 300, False)
        inbox.put(T.site("evil", "chunks"), b"c" * 1000, False)
    inbox.put(T.site("honest", "eval"), b"h" * 300, False)
    inbox.put(T.site("honest", "chunks"), b"x" * 900, False)  # 6,000 would be over the total: dropped
    assert len(inbox) == 3 + 4 + 1
    assert f"inbox over its byte budget: dropped 1 on {T.site('evil', 'eval')}" in caplog.text  # at once
    inbox._last_over -= 11  # (10 s later: the next drop says how many went since)
    inbox.put(T.site("evil", "eval"), b"e" * 300, False)
    said = caplog.records[-1].getMessage()
    assert f"97 on {T.site('evil', 'eval')}" in said and f"96 on {T.site('evil', 'chunks')}" in said
    items = [inbox.get() for _ in range(len(inbox))]
    assert [t for t, *_ in items].count(T.site("evil", "eval")) == 3
    assert [t for t, *_ in items].count(T.site("evil", "chunks")) == 4
    assert items[-1] == (T.site("honest", "eval"), b"h" * 300, False)
    inbox.put(T.site("big", "chunks"), b"b" * 10_000, False)  # over every budget, but the queue is empty
    inbox.put(T.site("evil", "eval"), b"e" * 300, False)  # the total is over now: dropped
    assert inbox.get() == (T.site("big", "chunks"), b"b" * 10_000, False) and len(inbox) == 0
    inbox.put(T.site("evil", "eval"), b"e" * 300, False)
    assert len(inbox) == 1
