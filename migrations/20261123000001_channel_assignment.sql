-- Identities, mailboxes and phone numbers of organizations, and the links
-- between them. Every invariant of the contract is enforced here, so that no
-- interleaving of concurrent requests (or a hand-written fixture) can break it.
-- Keys lead with organization_id, so the schema can be sharded by organization.

CREATE FUNCTION touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- A no-op update (an idempotent assign) leaves updated_at as it was.
    IF NEW IS DISTINCT FROM OLD THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;

-- Called in RETURNING, i.e. after the row lock is held: a statement that waited
-- past its request's deadline fails (and so writes nothing) instead of
-- writing what the caller was already told did not happen. A WHERE condition
-- cannot do this: a row that was only locked, not updated, is not re-checked.
CREATE FUNCTION ensure_in_time(remaining_seconds double precision) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF clock_timestamp() > statement_timestamp() + make_interval(secs => remaining_seconds) THEN
        RAISE EXCEPTION 'request deadline passed' USING ERRCODE = 'query_canceled';
    END IF;
    RETURN true;
END
$$;

CREATE TABLE mailboxes (
    organization_id text        NOT NULL,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    email_address   text        NOT NULL,
    display_name    text,
    status          text        NOT NULL DEFAULT 'active',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT mailboxes_pkey PRIMARY KEY (organization_id, id),
    CONSTRAINT mailboxes_organization_id_format
        CHECK (organization_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    CONSTRAINT mailboxes_email_address_not_blank CHECK (btrim(email_address) <> ''),
    CONSTRAINT mailboxes_status_valid CHECK (status IN ('active', 'paused', 'deleted'))
);

CREATE TABLE phone_numbers (
    organization_id      text        NOT NULL,
    id                   uuid        NOT NULL DEFAULT gen_random_uuid(),
    number               text        NOT NULL,
    type                 text        NOT NULL DEFAULT 'local',
    status               text        NOT NULL DEFAULT 'active',
    incoming_call_action text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT phone_numbers_pkey PRIMARY KEY (organization_id, id),
    CONSTRAINT phone_numbers_organization_id_format
        CHECK (organization_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    CONSTRAINT phone_numbers_number_e164 CHECK (number ~ '^\+[1-9][0-9]{1,14}$'),
    CONSTRAINT phone_numbers_type_valid CHECK (type IN ('local', 'toll_free')),
    CONSTRAINT phone_numbers_status_valid CHECK (status IN ('active', 'paused', 'released'))
);

CREATE TABLE identities (
    organization_id text        NOT NULL,
    id              uuid        NOT NULL DEFAULT gen_random_uuid(),
    agent_handle    text        NOT NULL,
    display_name    text,
    mailbox_id      uuid,
    phone_number_id uuid,
    status          text        NOT NULL DEFAULT 'active',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT identities_pkey PRIMARY KEY (organization_id, id),
    CONSTRAINT identities_organization_id_format
        CHECK (organization_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    -- The same rule the service applies to requests (src/domain.rs).
    CONSTRAINT identities_agent_handle_format
        CHECK (agent_handle ~ '^[A-Za-z0-9._-]{1,255}$'),
    CONSTRAINT identities_status_valid CHECK (status IN ('active', 'paused', 'deleted')),
    CONSTRAINT identities_agent_handle_unique UNIQUE (organization_id, agent_handle),
    -- A channel is linked to at most one identity (NULLs never collide).
    CONSTRAINT identities_mailbox_unique UNIQUE (organization_id, mailbox_id),
    CONSTRAINT identities_phone_number_unique UNIQUE (organization_id, phone_number_id),
    -- ...and only to an identity of its own organization.
    CONSTRAINT identities_mailbox_fkey FOREIGN KEY (organization_id, mailbox_id)
        REFERENCES mailboxes (organization_id, id),
    CONSTRAINT identities_phone_number_fkey FOREIGN KEY (organization_id, phone_number_id)
        REFERENCES phone_numbers (organization_id, id)
);

CREATE TRIGGER mailboxes_touch_updated_at BEFORE UPDATE ON mailboxes
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();
CREATE TRIGGER phone_numbers_touch_updated_at BEFORE UPDATE ON phone_numbers
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();
CREATE TRIGGER identities_touch_updated_at BEFORE UPDATE ON identities
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();
