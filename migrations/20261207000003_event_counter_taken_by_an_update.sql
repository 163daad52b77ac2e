-- The organization's event counter is taken with a plain UPDATE; the
-- upsert is left for an organization's first event.
--
-- Why: INSERT ... ON CONFLICT DO UPDATE, on finding the row, first locks it
-- (a WAL record of its own) and then updates it (a second one), after a
-- speculative probe of the primary key. An UPDATE locks the row as part of
-- updating it: one WAL record fewer for every link change. With
-- bench/event-cost (pgbench with bench/run's write statements, 10k
-- identities, six interleaved rounds at C = 8 and 32): 8.84 -> 8.30 WAL
-- records and 814 -> 781 WAL bytes per transaction, and 3.4-3.6 points of
-- the throughput the events cost won back (BENCHMARKS.md, "Change events").
--
-- What still holds: the row lock the counter's update takes is held until
-- commit, so an organization's events are numbered in commit order, as
-- before. Two first events of an organization racing each other both find
-- no row; the upsert then serializes them as it did before.
--
-- Replacing a function is a catalog change: no scan, no rewrite, and the
-- release before this one writes the same rows.

-- As migration 20261207000002 left it, with the counter taken by an UPDATE.
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
    UPDATE event_sequences
        SET last_sequence = last_sequence + changes
        WHERE organization_id = NEW.organization_id
        RETURNING last_sequence - changes + 1 INTO next_sequence;
    IF NOT FOUND THEN
        INSERT INTO event_sequences AS counter (organization_id, last_sequence)
        VALUES (NEW.organization_id, changes)
        ON CONFLICT (organization_id) DO UPDATE
            SET last_sequence = counter.last_sequence + changes
        RETURNING last_sequence - changes + 1 INTO next_sequence;
    END IF;
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
