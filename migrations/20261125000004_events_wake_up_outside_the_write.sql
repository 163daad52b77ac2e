-- The wake-up for watchers leaves the writing transaction.
--
-- A transaction that sends a NOTIFY takes a database-wide lock at commit and
-- holds it until its commit record is flushed, so every link change
-- committed alone, one disk flush after another: with the notify in the
-- trigger the write rows of bench/run lost 40-72 % of their throughput
-- (BENCHMARKS.md, "Change events"). The service now wakes its own watchers
-- when a write of an organization ends, and one task per replica sends the
-- organizations it wrote, a batch per transaction (synchronous_commit off),
-- on a connection of its own, for the other replicas' watchers
-- (src/events/hub.rs). Events of links changed by SQL outside the service
-- reach watchers at their fallback read (30 s) rather than within a second.

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
