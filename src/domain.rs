//! Values parsed once at the edge; holding one means it is valid.

use std::fmt;

use uuid::Uuid;

/// The caller's organization: 1-64 ASCII letters, digits, `_` or `-`, as
/// identity providers issue them (`org_2abc…`, a UUID, …).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct OrganizationId(String);

impl OrganizationId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(raw: &str) -> Option<Self> {
        let well_formed = (1..=Self::MAX_LEN).contains(&raw.len())
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        well_formed.then(|| Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for OrganizationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for OrganizationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An identity's handle, unique within its organization: 1-255 characters of
/// ASCII letters, digits, `.`, `_` and `-`. One leading `@` is not part of it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct AgentHandle(String);

impl AgentHandle {
    pub const MAX_LEN: usize = 255;

    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let handle = raw.strip_prefix('@').unwrap_or(raw);
        if handle.is_empty() {
            return Err("agent_handle is required");
        }
        if handle.len() > Self::MAX_LEN {
            return Err("agent_handle must be at most 255 characters");
        }
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
        if !handle.bytes().all(allowed) {
            return Err("agent_handle may contain only ASCII letters, digits, '.', '_' and '-'");
        }
        Ok(Self(handle.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for AgentHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The two kinds of channel an identity can hold one of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelKind {
    Mailbox,
    PhoneNumber,
}

impl ChannelKind {
    /// The request field that carries this kind's id.
    pub fn id_field(self) -> &'static str {
        match self {
            Self::Mailbox => "mailbox_id",
            Self::PhoneNumber => "phone_number_id",
        }
    }
}

/// The id of a mailbox or phone number, as given by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelId(Uuid);

impl ChannelId {
    pub fn parse(kind: ChannelKind, raw: &str) -> Result<Self, String> {
        let field = kind.id_field();
        if raw.is_empty() {
            return Err(format!("{field} is required"));
        }
        // Only the canonical 36-character form: braces, URNs and bare hex are
        // accepted by `Uuid::parse_str` but are not what the API documents.
        if raw.len() != 36 {
            return Err(format!(
                "{field} must be a UUID such as 0b6a4b9e-3c1f-4f8e-9d2a-5c7e1f0a9b3d"
            ));
        }
        Uuid::try_parse(raw).map(Self).map_err(|_| {
            format!("{field} must be a UUID such as 0b6a4b9e-3c1f-4f8e-9d2a-5c7e1f0a9b3d")
        })
    }

    pub fn as_uuid(self) -> Uuid {
        self.0
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// An e-mail address as the inventory stores it: `local@domain` (split at
/// the last `@`), both parts non-empty, no whitespace, at most 320
/// characters. Compared case-insensitively, stored as given.
#[derive(Clone, PartialEq, Eq)]
pub struct EmailAddress(String);

impl EmailAddress {
    pub const MAX_LEN: usize = 320;

    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        if raw.is_empty() {
            return Err("email_address is required");
        }
        if raw.chars().count() > Self::MAX_LEN {
            return Err("email_address must be at most 320 characters");
        }
        if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("email_address must not contain whitespace or control characters");
        }
        match raw.rsplit_once('@') {
            Some((local, domain)) if !local.is_empty() && !domain.is_empty() => {
                Ok(Self(raw.to_owned()))
            }
            _ => Err("email_address must be local@domain"),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A phone number in E.164: `+`, a non-zero digit, up to 15 digits in all.
#[derive(Clone, PartialEq, Eq)]
pub struct E164Number(String);

impl E164Number {
    pub fn parse(raw: &str, field: &str) -> Result<Self, String> {
        let digits = raw.strip_prefix('+').unwrap_or_default();
        let well_formed = (2..=15).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0');
        if well_formed {
            Ok(Self(raw.to_owned()))
        } else if raw.is_empty() {
            Err(format!("{field} is required"))
        } else {
            Err(format!("{field} must be E.164, such as +14155550123"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What `LookupIdentity` finds a channel by.
#[derive(Clone, Debug)]
pub enum LookupKey {
    MailboxId(ChannelId),
    EmailAddress(EmailAddress),
    PhoneNumberId(ChannelId),
    PhoneNumber(E164Number),
}

impl LookupKey {
    pub fn kind(&self) -> ChannelKind {
        match self {
            Self::MailboxId(_) | Self::EmailAddress(_) => ChannelKind::Mailbox,
            Self::PhoneNumberId(_) | Self::PhoneNumber(_) => ChannelKind::PhoneNumber,
        }
    }
}

/// The state of an identity, a mailbox or a phone number, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Active,
    Paused,
    /// An identity or a mailbox that is gone.
    Deleted,
    /// A phone number that is gone.
    Released,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Paused => "paused",
            Self::Deleted => "deleted",
            Self::Released => "released",
        }
    }
}

/// A phone number's type, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumberType {
    Local,
    TollFree,
}

impl NumberType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::TollFree => "toll_free",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn organization_ids_as_providers_issue_them_are_accepted() {
        for raw in [
            "org_2abcDEF",
            "0b6a4b9e-3c1f-4f8e-9d2a-5c7e1f0a9b3d",
            "a",
            &"x".repeat(64),
        ] {
            assert_eq!(
                OrganizationId::parse(raw).map(|o| o.0),
                Some(raw.to_owned()),
                "{raw}"
            );
        }
    }

    #[test]
    fn malformed_organization_ids_are_rejected() {
        for raw in [
            "",
            &"x".repeat(65),
            "org 1",
            "org/1",
            "org.1",
            "org\u{e9}",
            "org\n",
        ] {
            assert!(OrganizationId::parse(raw).is_none(), "{raw:?}");
        }
    }

    #[test]
    fn a_leading_at_sign_is_not_part_of_the_handle() {
        assert_eq!(
            AgentHandle::parse("@sales-agent").unwrap().as_str(),
            "sales-agent"
        );
        assert_eq!(
            AgentHandle::parse("sales-agent").unwrap().as_str(),
            "sales-agent"
        );
        assert!(AgentHandle::parse("@@sales-agent").is_err());
    }

    #[test]
    fn handle_length_is_bounded() {
        assert!(AgentHandle::parse("").is_err());
        assert!(AgentHandle::parse("@").is_err());
        assert!(AgentHandle::parse(&"a".repeat(255)).is_ok());
        assert!(AgentHandle::parse(&format!("@{}", "a".repeat(255))).is_ok());
        assert!(AgentHandle::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn handles_outside_the_character_set_are_rejected() {
        for raw in [
            "sales agent",
            "a/b",
            "a'; drop table identities; --",
            "agent\u{e9}",
            "a@b",
        ] {
            assert!(AgentHandle::parse(raw).is_err(), "{raw:?}");
        }
        assert!(AgentHandle::parse("Sales.Agent_01-x").is_ok());
    }

    proptest::proptest! {
        #[test]
        fn any_text_is_a_handle_or_a_refusal_never_a_panic(raw in "\\PC*|.*") {
            let _ = AgentHandle::parse(&raw);
            let _ = ChannelId::parse(ChannelKind::Mailbox, &raw);
            let _ = OrganizationId::parse(&raw);
        }

        #[test]
        fn every_handle_of_the_documented_set_is_accepted(raw in "[A-Za-z0-9._-]{1,255}") {
            let plain = AgentHandle::parse(&raw).unwrap();
            proptest::prop_assert_eq!(plain.as_str(), raw.as_str());
            let with_at = AgentHandle::parse(&format!("@{raw}")).unwrap();
            proptest::prop_assert_eq!(with_at, plain);
        }

        #[test]
        fn an_accepted_handle_parses_to_itself(raw in ".{0,300}") {
            if let Ok(handle) = AgentHandle::parse(&raw) {
                proptest::prop_assert_eq!(AgentHandle::parse(handle.as_str()).unwrap(), handle);
            }
        }

        #[test]
        fn organization_ids_are_exactly_the_documented_set(raw in "[A-Za-z0-9_-]{0,70}|.{0,70}") {
            let documented = (1..=64).contains(&raw.len())
                && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            proptest::prop_assert_eq!(OrganizationId::parse(&raw).is_some(), documented);
        }

        #[test]
        fn every_uuid_round_trips(bits: u128) {
            let text = Uuid::from_u128(bits).to_string();
            let parsed = ChannelId::parse(ChannelKind::PhoneNumber, &text).unwrap();
            proptest::prop_assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn email_addresses_are_local_at_domain() {
        for raw in [
            "a@b",
            "Jane.Doe+tag@example.com",
            "\"odd@local\"@example.com",
        ] {
            assert_eq!(EmailAddress::parse(raw).unwrap().as_str(), raw);
        }
        for raw in [
            "",
            "no-at-sign",
            "@example.com",
            "jane@",
            "jane doe@example.com",
            "jane@exa\tmple.com",
            "jane@example.com\0",
            &format!("{}@example.com", "a".repeat(320)),
        ] {
            assert!(EmailAddress::parse(raw).is_err(), "{raw:?}");
        }
        let longest = format!("{}@b", "a".repeat(318));
        assert!(EmailAddress::parse(&longest).is_ok());
    }

    #[test]
    fn phone_numbers_are_e164() {
        for raw in ["+14155550123", "+44", "+123456789012345"] {
            assert_eq!(E164Number::parse(raw, "number").unwrap().as_str(), raw);
        }
        for raw in [
            "",
            "14155550123",
            "+0415555",
            "+1",
            "+1234567890123456",
            "+1 415 555",
            "+1415555012a",
        ] {
            assert!(E164Number::parse(raw, "number").is_err(), "{raw:?}");
        }
    }

    #[test]
    fn channel_ids_must_be_canonical_uuids() {
        let id = "0b6a4b9e-3c1f-4f8e-9d2a-5c7e1f0a9b3d";
        assert_eq!(
            ChannelId::parse(ChannelKind::Mailbox, id)
                .unwrap()
                .to_string(),
            id
        );
        assert!(ChannelId::parse(ChannelKind::Mailbox, &id.to_uppercase()).is_ok());
        for raw in [
            "",
            "not-a-uuid",
            "0b6a4b9e3c1f4f8e9d2a5c7e1f0a9b3d",
            "{0b6a4b9e-3c1f-4f8e-9d2a-5c7e1f0a9b3d}",
        ] {
            let err = ChannelId::parse(ChannelKind::PhoneNumber, raw).unwrap_err();
            assert!(err.starts_with("phone_number_id "), "{err}");
        }
    }
}
