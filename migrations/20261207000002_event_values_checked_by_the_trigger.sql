-- The closed sets of kind, action and cause are kept by the trigger that
-- writes every event, rather than by CHECK constraints on assignment_events.
--
-- Why: PostgreSQL plans a table's CHECK expressions afresh each time an
-- INSERT statement starts, and the trigger starts one for every event, so
-- the three constraints were planned again for every link change: about
-- 1-4 % of the write statements' throughput (pgbench with bench/run's write
-- statements, 10k identities, C = 8, three runs of 3-4 interleaved rounds;
-- BENCHMARKS.md, "Change events").
--
-- What still holds: the trigger is the table's only writer (the service
-- never inserts events itself), kind and action are literals in it, and the
-- cause, the one value another statement can influence (through the
-- `channels.cause` setting), is checked here and refused with the same
-- SQLSTATE a CHECK constraint would raise (23514), so the change that would
-- have been recorded with it is refused too. A reader maps any other value
-- to the protobuf enum's UNSPECIFIED rather than dropping the event.
--
-- Dropping a constraint and replacing a function are catalog changes: no
-- scan, no rewrite, and the release before this one reads the same columns.

ALTER TABLE assignment_events
    DROP CONSTRAINT assignment_events_kind_valid,
    DROP CONSTRAINT assignment_events_action_valid,
    DROP CONSTRAINT assignment_events_cause_valid;

-- As migration 4 left it, with the cause checked.
CREATE OR REPLACE FUNCTION record_assignment_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    mailbox_changed boolean := OLD.mailbox_id IS DISTINCT FROM NEW.mailbox_id;
    number_changed boolean := OLD.phone_number_id IS DISTINCT FROM NEW.phone_number_id;
    changes integer := mailbox_changed::integer + number_changed::integer;
    actor text := coalesce(current_setting('channels.actor', true), '');
    cause text;
    next_sequence bigint;
BEGIN
    IF NEW.status = 'deleted' AND OLD.status IS DISTINCT FROM 'deleted' THEN
        cause := 'identity_deleted';
    ELSE
        cause := coalesce(nullif(current_setting('channels.cause', true), ''), 'requested');
        IF cause NOT IN ('requested', 'channel_removed') THEN
            RAISE EXCEPTION 'change event cause % is not one of requested, channel_removed', cause
                USING ERRCODE = 'check_violation';
        END IF;
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
            CASE WHEN NEW.mailbox_id IS NULL THEN 'unassigned' ELSE 'assigned' END,
            NEW.mailbox_id, OLD.mailbox_id, cause, actor);
        next_sequence := next_sequence + 1;
    END IF;
    IF number_changed THEN
        INSERT INTO assignment_events (organization_id, sequence, identity_id, agent_handle,
            kind, action, channel_id, previous_channel_id, cause, actor)
        VALUES (NEW.organization_id, next_sequence, NEW.id, NEW.agent_handle, 'phone_number',
            CASE WHEN NEW.phone_number_id IS NULL THEN 'unassigned' ELSE 'assigned' END,
            NEW.phone_number_id, OLD.phone_number_id, cause, actor);
    END IF;
    RETURN NULL;
END
$$;
