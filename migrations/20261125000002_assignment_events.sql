-- Change events: every change of a link, recorded in the same transaction as
-- the change, numbered per organization in commit order.
--
-- Why the numbers follow commit order: a transaction gets its numbers from
-- its organization's row in event_sequences, and the row stays locked until
-- that transaction commits or rolls back. A second writer of the same
-- organization waits for the lock and then reads the first one's committed
-- count, so it numbers after it and commits after it. A reader that has
-- seen sequence s therefore finds every event numbered above s committed
-- after s was, never before: resuming "after s" misses nothing and repeats
-- nothing. (A plain sequence would hand out numbers at statement time; a
-- transaction holding a smaller number could commit after a reader had seen
-- a larger one, and that event would be skipped forever.) The counter is
-- taken last, after the identity row, so that two writers cannot deadlock
-- over it.

CREATE TABLE event_sequences (
    organization_id text   NOT NULL PRIMARY KEY,
    last_sequence   bigint NOT NULL DEFAULT 0,
    -- Every event of the organization numbered up to this one was removed
    -- by retention: a reader resuming below it has missed some.
    removed_through bigint NOT NULL DEFAULT 0
);

CREATE TABLE assignment_events (
    organization_id     text        NOT NULL,
    sequence            bigint      NOT NULL,
    identity_id         uuid        NOT NULL,
    agent_handle        text        NOT NULL,
    kind                text        NOT NULL,
    action              text        NOT NULL,
    channel_id          uuid,
    previous_channel_id uuid,
    cause               text        NOT NULL,
    actor               text        NOT NULL DEFAULT '',
    occurred_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT assignment_events_pkey PRIMARY KEY (organization_id, sequence),
    CONSTRAINT assignment_events_kind_valid CHECK (kind IN ('mailbox', 'phone_number')),
    CONSTRAINT assignment_events_action_valid CHECK (action IN ('assigned', 'unassigned')),
    CONSTRAINT assignment_events_cause_valid
        CHECK (cause IN ('requested', 'channel_removed', 'identity_deleted'))
);

-- Retention finds what is old without a scan of every event.
CREATE INDEX assignment_events_occurred_at ON assignment_events (occurred_at);

-- One row per changed link. The actor is the statement's
-- `channels.actor` setting (the caller's subject; the service sets it with
-- the change), the cause the `channels.cause` setting of the unlinking
-- triggers, or the identity's own deletion; else the change was requested.
CREATE FUNCTION record_assignment_events() RETURNS trigger
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
    -- A wake-up for watchers, delivered at commit; the data is the table.
    PERFORM pg_notify('channels_assignment_events', NEW.organization_id);
    RETURN NULL;
END
$$;

-- Not `UPDATE OF mailbox_id, …`: a deletion clears them in a BEFORE trigger,
-- which such a trigger would not see.
CREATE TRIGGER identities_record_assignment_events
    AFTER UPDATE ON identities
    FOR EACH ROW
    WHEN (OLD.mailbox_id IS DISTINCT FROM NEW.mailbox_id
          OR OLD.phone_number_id IS DISTINCT FROM NEW.phone_number_id)
    EXECUTE FUNCTION record_assignment_events();

-- The unlinking triggers say why they unlink.
CREATE OR REPLACE FUNCTION unlink_removed_mailbox() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('channels.cause', 'channel_removed', true);
    UPDATE identities SET mailbox_id = NULL
    WHERE organization_id = NEW.organization_id AND mailbox_id = NEW.id;
    PERFORM set_config('channels.cause', '', true);
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION unlink_released_phone_number() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('channels.cause', 'channel_removed', true);
    UPDATE identities SET phone_number_id = NULL
    WHERE organization_id = NEW.organization_id AND phone_number_id = NEW.id;
    PERFORM set_config('channels.cause', '', true);
    RETURN NULL;
END
$$;
