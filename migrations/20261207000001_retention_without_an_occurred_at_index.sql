-- Retention without an index on occurred_at: every link change wrote an
-- entry into it, and only the pruning round (every 30 s) read it.
--
-- Nothing needs it. An organization's events are only ever removed as a
-- prefix of its sequence (see PRUNE_EVENTS in src/store/events.rs), so an
-- organization has something to remove exactly when its lowest-numbered
-- kept event is past the cutoff, and that event is one probe of the primary
-- key (organization_id, sequence) away. Pruning visits event_sequences (one
-- row per organization) and probes each organization with kept events.
--
-- Not a BRIN index either, though one is nearly free to insert into: a BRIN
-- range's summary only ever widens, and retention's freed pages are filled
-- with new events, so once the table has wrapped round every range would
-- span from its first event's time to its latest, match any cutoff, and
-- each pruning round would read the whole table.
--
-- Dropping an index is a catalog change: no rewrite, and the release before
-- this one (whose pruning used the index) still works, scanning instead.

DROP INDEX assignment_events_occurred_at;
