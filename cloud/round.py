"""One round being collected by the aggregator (`OpenRound`): whom it selected, what arrived, what was
accepted, failed or rejected; the rule that admits a site's manifest (`admit`) and the largest update a
round takes (`update_limit`). Pure state, no MQTT and no disk: cloud/server.py drives it through the
round's states (docs/protocol.md) and journals what it accepts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cloud.strategy import TeacherMean
from protocol.chunks import InboundBlob, check_ref
from protocol.messages import BlobRef, GroupBase, UpdateManifest

MAX_REJECTION_ENTRIES = 256  # distinct (site, reason) entries a round's summary lists; the rest are counted
MAX_REASON_CHARS = 500  # a rejection's reason as kept and said: a peer's text (a tensor name) can be any size


def short_reason(reason: str) -> str:
    """`reason` cut to MAX_REASON_CHARS, saying how much was cut."""
    if len(reason) <= MAX_REASON_CHARS:
        return reason
    return f"{reason[:MAX_REASON_CHARS]}... ({len(reason) - MAX_REASON_CHARS} more characters)"


@dataclass(frozen=True)
class GroupBlob:
    """A group's model as the round sends it (client clustering)."""

    base_hash: str
    blob: bytes
    ref: BlobRef


@dataclass
class OpenRound:
    """One round being collected: who is selected, what arrived, what was accepted, failed or rejected.

    Accepted updates are journaled and validated (decoded, shapes, finite, norm); they are folded only
    at close, when the aggregator knows every claim of the round and can decide the weights.
    """

    number: int
    selected: list[str]
    base_hash: str
    blob: bytes
    blob_ref: BlobRef
    deadline: float
    started: float
    kd_due: bool
    teachers: TeacherMean | None
    limit: int  # the largest update blob (and decoded payload) this round accepts, in bytes
    train: bool = True  # False: the evaluation round after the last round (reports, no updates)
    restarts: int = 0
    extensions: int = 0
    manifests: dict[str, UpdateManifest] = field(default_factory=dict)
    transfers: dict[str, InboundBlob] = field(default_factory=dict)  # pending manifests' uploads
    accepted: dict[str, UpdateManifest] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # waiting sites that failed: site -> reason
    # every site that reported failing this round, also one selected again since: only the retry rule of a
    # restarted round (FAILED_RETRIES) selects it again, whatever status it sends after; journaled
    failed_once: set[str] = field(default_factory=set)
    retried: dict[str, int] = field(default_factory=dict)  # site -> times selected again after failing
    rejections: list[dict] = field(default_factory=list)  # {"site", "reason", "count"}, by note_rejection
    last_resend: dict[str, float] = field(default_factory=dict)
    reports: dict[str, dict[str, float]] = field(default_factory=dict)  # evaluation round: site -> metrics
    said: float = field(default_factory=time.monotonic)  # when progress was last logged
    group_of: dict[str, int] = field(default_factory=dict)  # client clustering: placed site -> group
    group_bases: dict[int, GroupBlob] = field(default_factory=dict)  # every group's model, as a blob

    def base_of(self, site: str) -> str:
        """The base hash `site` trains from this round: its group's model, or the round's own."""
        group = self.group_of.get(site)
        return self.base_hash if group is None else self.group_bases[group].base_hash

    def blob_by_id(self, blob_id: str) -> tuple[bytes, BlobRef] | None:
        """A model blob of this round (its own or a group's) by blob id."""
        for blob, ref in [(self.blob, self.blob_ref), *((g.blob, g.ref) for g in self.group_bases.values())]:
            if ref.blob_id == blob_id:
                return blob, ref
        return None

    def groups(self) -> list[GroupBase]:
        """The RoundStart's groups: each group with a selected site, and its selected sites."""
        out = []
        for g, base in sorted(self.group_bases.items()):
            sites = [s for s in self.selected if self.group_of.get(s) == g]
            if sites:
                out.append(GroupBase(group=g, base_hash=base.base_hash, blob=base.ref, sites=sites))
        return out

    def note_rejection(self, site: str, reason: str) -> bool:
        """Record a rejection in the round's summary: one entry per site and reason with a count, so a
        message replayed thousands of times is one entry; past MAX_REJECTION_ENTRIES distinct entries
        the rest are counted in one last entry (site "*"). Returns whether the entry is new."""
        reason = short_reason(reason)
        for entry in self.rejections:
            if entry["site"] == site and entry["reason"] == reason:
                entry["count"] += 1
                return False
        if len(self.rejections) >= MAX_REJECTION_ENTRIES:
            if self.rejections[-1]["site"] != "*":
                self.rejections.append({"site": "*", "reason": "more rejections, not itemised", "count": 0})
            self.rejections[-1]["count"] += 1
            return False
        self.rejections.append({"site": site, "reason": reason, "count": 1})
        return True

    def waiting(self) -> set[str]:
        """Selected sites that have neither an accepted update (or evaluation report) nor failed."""
        return set(self.selected) - set(self.accepted) - set(self.reports) - set(self.failed)

    def doing(self, states: dict[str, tuple[str, int | None]]) -> list[str]:
        """What each waiting site is doing, for the progress line: its upload's progress, or the state
        of its last status (`states`: site -> (state, round)). A site's status says "training" for any
        round it works on: in an evaluation round that work is the evaluation, and a status of an older
        round says the site is still on that one (stopped, or slow) and has not begun this one."""
        out = []
        for site in sorted(self.waiting()):
            m, t = self.manifests.get(site), self.transfers.get(site)
            if m is not None:
                out.append(f"{site} uploading {t.received() if t is not None else 0}/{m.blob.chunks} chunks")
                continue
            state, round_ = states.get(site, ("offline", None))
            if state == "training" and round_ is not None and round_ != self.number:
                state = f"still on round {round_}"
            elif state == "training" and not self.train:
                state = "evaluating"
            elif state == "online":  # connected, work not begun: fetching the model, or idle
                state = "online, not started yet"
            out.append(f"{site} {state}")
        return out


def update_limit(global_blob_bytes: int, tensors: int, max_update_bytes: int) -> int:
    """The largest update this model can honestly produce in any encoding (fp32 + int8 scales + zstd
    framing), capped by the configured `max_update_bytes`: a manifest announcing more is refused."""
    return min(max_update_bytes, int(global_blob_bytes * 1.01) + 256 * tensors + 65536)


def admit(cur: OpenRound | None, site: str, m: UpdateManifest, closed: int = -1) -> tuple[str, str] | None:
    """(kind, why) a manifest that came on `site`'s topic cannot be collected, kind one of
    cloud.monitoring.REJECT_KINDS or "duplicate" (already accepted); None when it can. `closed`: the
    last closed round (a manifest of it or earlier, between rounds, is stale)."""
    if m.site != site:
        return "wrong_site", f"the manifest names site {m.site} but came on the topic of site {site}"
    if cur is None:
        stale = m.round <= closed
        return "no_round", f"stale round {m.round} (round {closed} closed)" if stale else "no round is open"
    if m.round != cur.number:
        which = "stale" if m.round < cur.number else "future"
        return "no_round", f"{which} round {m.round} (current round {cur.number})"
    if not cur.train:
        return "evaluation_round", f"round {cur.number} is an evaluation round: it takes no updates"
    if m.base_hash != cur.base_of(site):
        return "wrong_base", "update computed against another base model (wrong base hash)"
    if site not in cur.selected:
        return "not_selected", f"site {site} is not selected for round {cur.number}"
    if site in cur.accepted:
        if cur.accepted[site].blob.blob_id == m.blob.blob_id:
            return "duplicate", ""
        return "conflict", "a different update of this site was already accepted this round"
    why = check_ref(m.blob, cur.limit)
    return ("bad_manifest", why) if why else None
