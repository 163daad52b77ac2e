-- Retention without an index on occurred_at.
--
-- Migration 5 made that index a BRIN index, cheap to insert into. But
-- retention deletes the oldest events and VACUUM hands their pages to new
-- ones, and a BRIN range's summary only ever widens: once the table has
-- wrapped round, every range spans from its first event's time to its
-- latest, matches "older than the cutoff", and each pruning round (every
-- 30 s) would read the whole table. A B-tree stays exact but costs every
-- link change another index entry.
--
-- Neither is needed. An organization's events can only be removed as a
-- prefix of its sequence (see PRUNE_EVENTS in src/store/events.rs), so an
-- organization has something to remove exactly when its lowest-numbered
-- kept event is past the cutoff, and that event is one probe of the primary
-- key (organization_id, sequence) away. Pruning now visits event_sequences
-- (one row per organization) and probes each organization with kept events;
-- writes maintain one index on assignment_events, the primary key.

DROP INDEX assignment_events_occurred_at;
