-- Cheaper event rows: what recording an event costs every link change.
--
-- A profile of PostgreSQL under bench/run's write mix (perf, pgbench with
-- the service's statements) put about a tenth of the trigger's time in
-- re-reading the three CHECK constraints of assignment_events, which the
-- executor parses from their stored form for every INSERT the trigger runs,
-- and a further share in the B-tree on occurred_at, which only retention
-- reads. So:
--
-- * kind, action and cause become enum types: the same three closed sets,
--   enforced by the type (a value outside it cannot be stored) rather than by
--   a CHECK evaluated per row, and four bytes a value instead of a string;
-- * occurred_at is indexed by a BRIN index: events are appended in time
--   order, so block ranges summarise them well, retention still finds old
--   events without reading every row, and an insert into a range not yet
--   summarised costs next to nothing (autosummarize summarises each range
--   once it is full).
--
-- Changing the columns' types rewrites the table under an ACCESS EXCLUSIVE
-- lock, so writes wait for this migration; with the events of at most
-- EVENTS_RETENTION kept, that is seconds, not minutes.

CREATE TYPE assignment_event_kind AS ENUM ('mailbox', 'phone_number');
CREATE TYPE assignment_event_action AS ENUM ('assigned', 'unassigned');
CREATE TYPE assignment_event_cause AS ENUM ('requested', 'channel_removed', 'identity_deleted');

DROP INDEX assignment_events_occurred_at;

ALTER TABLE assignment_events
    DROP CONSTRAINT assignment_events_kind_valid,
    DROP CONSTRAINT assignment_events_action_valid,
    DROP CONSTRAINT assignment_events_cause_valid,
    ALTER COLUMN kind TYPE assignment_event_kind USING kind::assignment_event_kind,
    ALTER COLUMN action TYPE assignment_event_action USING action::assignment_event_action,
    ALTER COLUMN cause TYPE assignment_event_cause USING cause::assignment_event_cause;

CREATE INDEX assignment_events_occurred_at ON assignment_events
    USING brin (occurred_at) WITH (autosummarize = on);

-- As migration 4 left it, with the enum types named where a text value
-- would otherwise be inferred.
CREATE OR REPLACE FUNCTION record_assignment_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    mailbox_changed boolean := OLD.mailbox_id IS DISTINCT FROM NEW.mailbox_id;
    number_changed boolean := OLD.phone_number_id IS DISTINCT FROM NEW.phone_number_id;
    changes integer := mailbox_changed::integer + number_changed::integer;
    actor text := coalesce(current_setting('channels.actor', true), '');
    cause assignment_event_cause;
    next_sequence bigint;
BEGIN
    IF NEW.status = 'deleted' AND OLD.status IS DISTINCT FROM 'deleted' THEN
        cause := 'identity_deleted';
    ELSE
        cause := coalesce(nullif(current_setting('channels.cause', true), ''), 'requested');
    END IF;
    INSERT INTO event_sequences AS counter (organization_id, last_sequence)
    VALUES (NEW.organization_id, changes)
    ON CONFLICT (organization_id) DO UPDATE
        SET last_sequence = counter.last_sequence + changes
    RETURNING last_sequence - changes + 1 INTO next_sequence;
    -- A deleted identity holding both: the mailbox's event first.
    IF mailbox_changed THEN
        INSERT INTO assignment_events (organization_id, sequence, identity_id, agent_handle,
            kind, action, channel_id, previous_channel_id, cause, actor)
        VALUES (NEW.organization_id, next_sequence, NEW.id, NEW.agent_handle, 'mailbox',
            CASE WHEN NEW.mailbox_id IS NULL THEN 'unassigned'
                 ELSE 'assigned' END::assignment_event_action,
            NEW.mailbox_id, OLD.mailbox_id, cause, actor);
        next_sequence := next_sequence + 1;
    END IF;
    IF number_changed THEN
        INSERT INTO assignment_events (organization_id, sequence, identity_id, agent_handle,
            kind, action, channel_id, previous_channel_id, cause, actor)
        VALUES (NEW.organization_id, next_sequence, NEW.id, NEW.agent_handle, 'phone_number',
            CASE WHEN NEW.phone_number_id IS NULL THEN 'unassigned'
                 ELSE 'assigned' END::assignment_event_action,
            NEW.phone_number_id, OLD.phone_number_id, cause, actor);
    END IF;
    RETURN NULL;
END
$$;
