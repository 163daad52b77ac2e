-- Change events are numbered from one sequence, under a lock per
-- organization that the writer holds until its transaction ends, rather
-- than from a counter row per organization.
--
-- Why: the counter's UPDATE was a statement of its own in every link
-- change: an executor run, a heap update and its WAL record. A
-- transaction-level advisory lock and nextval cost neither a statement nor
-- (but once in 32 numbers) WAL. BENCHMARKS.md, "Change events", has the
-- figures.
--
-- Why the numbers still follow commit order within an organization: a
-- writer takes its organization's lock before it takes a number, and
-- PostgreSQL releases a transaction's locks only after its commit is
-- visible (or its rollback done). A second writer of the organization
-- therefore takes its numbers after the first has ended, and nextval,
-- uncached, hands out increasing numbers over time: so it numbers after
-- the first and commits after it. A reader that has seen s finds every
-- event of the organization numbered above s committed after s was: resuming
-- "after s" misses nothing and repeats nothing. The numbers are no longer
-- contiguous within an organization (other organizations' events take the
-- numbers between, and a rolled-back change uses its number up); the
-- contract never promised that. Two organizations whose ids hash alike
-- share a lock: they wait for each other, never misnumber. The lock is the
-- two-key form (class 0x65766e74, "evnt"), which never meets the relay's
-- one-key lock. It is taken after the identity row, as the counter was, so
-- that two writers cannot deadlock over it.
--
-- Deploying: writers of identities are held off (SHARE ROW EXCLUSIVE; reads
-- go on) while the numbering changes, so that no change numbered by the
-- counter commits after one numbered by the sequence; this waits for the
-- write transactions in flight, which are single statements. The sequence
-- starts above every number the counters gave. event_sequences stays: it
-- keeps retention's mark (removed_through), and last_sequence the count of
-- the events numbered before this migration (the events-written metric
-- adds the sequence's). A replica of the release before this one, during a
-- rolling deploy, finds the relay's backlog through last_sequence, which no
-- longer moves: if it holds the relay's lock it publishes nothing new until
-- it stops, and the new release's relay then publishes every event from
-- the durable positions (nothing is lost or reordered).

LOCK TABLE identities IN SHARE ROW EXCLUSIVE MODE;

CREATE SEQUENCE assignment_event_numbers AS bigint NO CYCLE;

DO $$
DECLARE
    numbered bigint := (SELECT greatest(
        (SELECT max(last_sequence) FROM event_sequences),
        (SELECT max(sequence) FROM assignment_events),
        0));
BEGIN
    EXECUTE format('ALTER SEQUENCE assignment_event_numbers START WITH %1$s RESTART WITH %1$s',
        numbered + 1);
END
$$;

-- As migration 20261207000003 left it, numbered from the sequence.
CREATE OR REPLACE FUNCTION record_assignment_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    mailbox_changed boolean := OLD.mailbox_id IS DISTINCT FROM NEW.mailbox_id;
    number_changed boolean := OLD.phone_number_id IS DISTINCT FROM NEW.phone_number_id;
    actor text := coalesce(current_setting('channels.actor', true), '');
    cause text;
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
    PERFORM pg_advisory_xact_lock(1702260340, hashtext(NEW.organization_id));
    -- A deleted identity holding both: the mailbox's event first.
    IF mailbox_changed THEN
        INSERT INTO assignment_events (organization_id, sequence, identity_id, agent_handle,
            kind, action, channel_id, previous_channel_id, cause, actor)
        VALUES (NEW.organization_id, nextval('assignment_event_numbers'), NEW.id,
            NEW.agent_handle, 'mailbox',
            CASE WHEN NEW.mailbox_id IS NULL THEN 'unassigned' ELSE 'assigned' END,
            NEW.mailbox_id, OLD.mailbox_id, cause, actor);
    END IF;
    IF number_changed THEN
        INSERT INTO assignment_events (organization_id, sequence, identity_id, agent_handle,
            kind, action, channel_id, previous_channel_id, cause, actor)
        VALUES (NEW.organization_id, nextval('assignment_event_numbers'), NEW.id,
            NEW.agent_handle, 'phone_number',
            CASE WHEN NEW.phone_number_id IS NULL THEN 'unassigned' ELSE 'assigned' END,
            NEW.phone_number_id, OLD.phone_number_id, cause, actor);
    END IF;
    RETURN NULL;
END
$$;
