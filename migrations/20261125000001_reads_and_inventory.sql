-- Reads and inventory: the uniqueness the inventory promises, the indexes the
-- reads use, and channels or identities that leave taking their links with
-- them. Applies to a database that already holds data of the first schema.

-- A new or changed address of a live mailbox must be local@domain (split at
-- the last '@'), both parts non-empty, no whitespace, at most 320
-- characters, as the service checks (src/domain.rs). NOT VALID: rows written
-- before this migration are not re-checked and keep being served; a live
-- one that is updated must get a well-formed address, and any can be deleted.
ALTER TABLE mailboxes ADD CONSTRAINT mailboxes_email_address_format
    CHECK (status = 'deleted'
           OR (char_length(email_address) <= 320
               AND email_address ~ '^[^[:space:]]+@[^@[:space:]]+$')) NOT VALID;

-- The first schema unlinked nothing when an identity was deleted, or a
-- mailbox deleted or a number released, by SQL: such links would contradict
-- what this schema keeps true from now on (a deleted identity holds no
-- channel; a removed channel is linked to no identity), so they go now.
UPDATE identities SET mailbox_id = NULL, phone_number_id = NULL
WHERE status = 'deleted' AND (mailbox_id IS NOT NULL OR phone_number_id IS NOT NULL);
UPDATE identities AS i SET mailbox_id = NULL
FROM mailboxes AS m
WHERE m.organization_id = i.organization_id AND m.id = i.mailbox_id AND m.status = 'deleted';
UPDATE identities AS i SET phone_number_id = NULL
FROM phone_numbers AS p
WHERE p.organization_id = i.organization_id AND p.id = i.phone_number_id
  AND p.status = 'released';

-- Existing duplicates would make the unique indexes below fail with an
-- opaque error: say which, and stop, rather than pick a winner silently.
DO $$
DECLARE
    addresses bigint;
    numbers bigint;
BEGIN
    SELECT count(*) INTO addresses FROM (
        SELECT 1 FROM mailboxes WHERE status <> 'deleted'
        GROUP BY organization_id, lower(email_address) HAVING count(*) > 1) AS duplicated;
    SELECT count(*) INTO numbers FROM (
        SELECT 1 FROM phone_numbers WHERE status <> 'released'
        GROUP BY organization_id, number HAVING count(*) > 1) AS duplicated;
    IF addresses > 0 OR numbers > 0 THEN
        RAISE EXCEPTION
            '% e-mail addresses (case-insensitively) and % phone numbers are used by more than one live record of an organization',
            addresses, numbers
            USING HINT = 'Mark all but one of each deleted (mailboxes) or released (phone numbers), then migrate again. '
                'Find them with: SELECT organization_id, lower(email_address), array_agg(id) FROM mailboxes '
                'WHERE status <> ''deleted'' GROUP BY 1, 2 HAVING count(*) > 1';
    END IF;
END
$$;

-- An address is unique within an organization among mailboxes that are not
-- deleted, whatever its case; a number among numbers that are not released.
CREATE UNIQUE INDEX mailboxes_email_address_unique
    ON mailboxes (organization_id, lower(email_address)) WHERE status <> 'deleted';
CREATE UNIQUE INDEX phone_numbers_number_unique
    ON phone_numbers (organization_id, number) WHERE status <> 'released';

-- ListIdentities pages by agent_handle in byte order, whatever the server's
-- locale: the index, the ORDER BY and the comparison all use "C".
CREATE INDEX identities_listing
    ON identities (organization_id, agent_handle COLLATE "C") WHERE status <> 'deleted';

-- A mailbox that is deleted, or a phone number that is released, is
-- unlinked from its identity in the same transaction, however the status
-- changed (an upsert or an operator's SQL). An AFTER trigger's statement
-- sees links committed while the status update waited for their locks
-- (assign takes FOR SHARE on the channel), which the updating statement's
-- own snapshot would not.
CREATE FUNCTION unlink_removed_mailbox() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE identities SET mailbox_id = NULL
    WHERE organization_id = NEW.organization_id AND mailbox_id = NEW.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER mailboxes_unlink_when_deleted
    AFTER UPDATE OF status ON mailboxes
    FOR EACH ROW WHEN (NEW.status = 'deleted' AND OLD.status <> 'deleted')
    EXECUTE FUNCTION unlink_removed_mailbox();

CREATE FUNCTION unlink_released_phone_number() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE identities SET phone_number_id = NULL
    WHERE organization_id = NEW.organization_id AND phone_number_id = NEW.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER phone_numbers_unlink_when_released
    AFTER UPDATE OF status ON phone_numbers
    FOR EACH ROW WHEN (NEW.status = 'released' AND OLD.status <> 'released')
    EXECUTE FUNCTION unlink_released_phone_number();

-- A deleted identity holds no channel: they become free with its deletion.
CREATE FUNCTION unlink_deleted_identity() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.mailbox_id := NULL;
    NEW.phone_number_id := NULL;
    RETURN NEW;
END
$$;

CREATE TRIGGER identities_unlink_when_deleted
    BEFORE UPDATE OF status ON identities
    FOR EACH ROW WHEN (NEW.status = 'deleted')
    EXECUTE FUNCTION unlink_deleted_identity();
