//! Everything a caller controls before a query runs: the metadata the
//! organization is read from (bearer token, trusted header) and the request's
//! fields, page sizes and page tokens included. None of it may panic, every
//! refusal must be one the contract names, and every value accepted must be
//! one the database's checks accept.
#![no_main]

use std::sync::OnceLock;

use channel_assignment::{
    auth::Authenticator,
    config::AuthSettings,
    domain::{AgentHandle, ChannelId, ChannelKind, E164Number, EmailAddress, OrganizationId},
    error::ServiceError,
    operations::page::{self, List, PageTokens},
    store::ListCursor,
};
use libfuzzer_sys::fuzz_target;
use tonic::metadata::{MetadataMap, MetadataValue};
use uuid::Uuid;

/// Every list that pages, each filter a list of its own.
const LISTS: [List; 5] = [
    List::Identities,
    List::Mailboxes {
        unassigned_only: false,
    },
    List::Mailboxes {
        unassigned_only: true,
    },
    List::PhoneNumbers {
        unassigned_only: false,
    },
    List::PhoneNumbers {
        unassigned_only: true,
    },
];

/// The characters of unpadded URL-safe base64, which page tokens are made of.
const TOKEN_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn page_tokens() -> &'static PageTokens {
    static TOKENS: OnceLock<PageTokens> = OnceLock::new();
    TOKENS.get_or_init(|| PageTokens::new("fuzzing-page-token-key"))
}

fn organizations() -> &'static [OrganizationId; 2] {
    static ORGANIZATIONS: OnceLock<[OrganizationId; 2]> = OnceLock::new();
    ORGANIZATIONS.get_or_init(|| {
        ["org_alpha", "org_beta"].map(|raw| OrganizationId::parse(raw).expect("well-formed"))
    })
}

/// An accepted address is one `mailboxes_email_address_format` accepts:
/// at most 320 characters, no whitespace, non-empty parts around the last `@`.
fn check_email_address(text: &str) {
    match EmailAddress::parse(text) {
        Ok(address) => {
            let stored = address.as_str();
            assert_eq!(stored, text, "stored as given");
            assert!(stored.chars().count() <= EmailAddress::MAX_LEN);
            assert!(!stored.chars().any(char::is_whitespace));
            let (local, domain) = stored.rsplit_once('@').expect("an @");
            assert!(!local.is_empty() && !domain.is_empty() && !domain.contains('@'));
        }
        Err(description) => assert!(description.starts_with("email_address"), "{description}"),
    }
}

/// An accepted number is one `phone_numbers_number_e164` accepts:
/// `^\+[1-9][0-9]{1,14}$`.
fn check_e164(text: &str) {
    match E164Number::parse(text, "phone_number") {
        Ok(number) => {
            assert_eq!(number.as_str(), text);
            let digits = text.strip_prefix('+').expect("a leading +");
            assert!((2..=15).contains(&digits.len()), "{text:?}");
            assert!(digits.bytes().all(|b| b.is_ascii_digit()), "{text:?}");
            assert!(!digits.starts_with('0'), "{text:?}");
        }
        Err(description) => assert!(description.starts_with("phone_number"), "{description}"),
    }
}

/// 0 is the default, above the maximum the maximum, negative refused.
fn check_page_size(raw: i32) {
    match page::page_size(raw) {
        Ok(size) => {
            assert!(raw >= 0, "{raw} accepted");
            let expected = match usize::try_from(raw).expect("not negative") {
                0 => page::DEFAULT_PAGE_SIZE,
                asked => asked.min(page::MAX_PAGE_SIZE),
            };
            assert_eq!(size, expected, "page_size({raw})");
        }
        Err(violation) => {
            assert!(raw < 0, "{raw} refused");
            assert_eq!(violation.field, "page_size");
        }
    }
}

/// Any text, as a page token of any list: the first page (only when empty),
/// a position of that list's kind, or a refusal on `page_token`.
fn check_resume(text: &str) {
    let tokens = page_tokens();
    for organization in organizations() {
        for list in LISTS {
            match tokens.resume(organization, list, text) {
                Ok(None) => assert!(text.is_empty(), "{text:?} resumed as the first page"),
                Ok(Some(cursor)) => match (list, cursor) {
                    (List::Identities, ListCursor::Handle(_))
                    | (List::Mailboxes { .. } | List::PhoneNumbers { .. }, ListCursor::Id(_)) => {}
                    (list, cursor) => panic!("{list:?} resumed at {cursor:?}"),
                },
                Err(violation) => assert_eq!(violation.field, "page_token"),
            }
        }
    }
}

/// A token the server issued resumes at its position, for its own list and
/// organization only; one character changed, or one dropped, and it is
/// refused.
fn check_round_trip(selector: u8, bytes: &[u8], text: &str) {
    let tokens = page_tokens();
    let [organization, other] = organizations();
    let (organization, other) = if selector & 0x10 == 0 {
        (organization, other)
    } else {
        (other, organization)
    };
    let list = LISTS[usize::from(selector) % LISTS.len()];
    let cursor = match list {
        List::Identities => ListCursor::Handle(text.to_owned()),
        List::Mailboxes { .. } | List::PhoneNumbers { .. } => {
            let mut id = [0u8; 16];
            for (slot, byte) in id.iter_mut().zip(bytes) {
                *slot = *byte;
            }
            ListCursor::Id(Uuid::from_bytes(id))
        }
    };
    let token = tokens.issue(organization, list, &cursor);
    assert!(!token.is_empty());
    assert!(
        token.bytes().all(|b| TOKEN_ALPHABET.contains(&b)),
        "{token}"
    );
    assert_eq!(
        tokens.resume(organization, list, &token),
        Ok(Some(cursor.clone())),
        "round trip of {cursor:?} in {list:?}"
    );
    for elsewhere in LISTS.into_iter().filter(|l| *l != list) {
        assert!(
            tokens.resume(organization, elsewhere, &token).is_err(),
            "a {list:?} token resumed {elsewhere:?}"
        );
    }
    assert!(
        tokens.resume(other, list, &token).is_err(),
        "a token resumed another organization's list"
    );
    assert!(
        PageTokens::new("another key")
            .resume(organization, list, &token)
            .is_err(),
        "a token resumed under another key"
    );

    let mut altered = token.clone().into_bytes();
    let at = bytes.len() % altered.len();
    let replacement = TOKEN_ALPHABET
        [(usize::from(selector) + 1 + usize::from(altered[at])) % TOKEN_ALPHABET.len()];
    let replacement = if replacement == altered[at] {
        TOKEN_ALPHABET[(usize::from(replacement) + 1) % TOKEN_ALPHABET.len()]
    } else {
        replacement
    };
    altered[at] = replacement;
    let altered = String::from_utf8(altered).expect("ASCII");
    assert_ne!(altered, token);
    assert!(
        tokens.resume(organization, list, &altered).is_err(),
        "an altered token resumed: {token} -> {altered}"
    );
    assert!(
        tokens
            .resume(organization, list, &token[..token.len() - 1])
            .is_err(),
        "a truncated token resumed"
    );
}

fn authenticators() -> &'static [Authenticator; 2] {
    static AUTHENTICATORS: OnceLock<[Authenticator; 2]> = OnceLock::new();
    AUTHENTICATORS.get_or_init(|| {
        let jwt = AuthSettings::hs256("fuzzing-secret-0123456789abcdef");
        let header = AuthSettings {
            trusted_header: true,
            ..jwt.clone()
        };
        [
            Authenticator::from_settings(&jwt).expect("valid settings"),
            Authenticator::from_settings(&header).expect("valid settings"),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);

    let _ = AgentHandle::parse(&text);
    let _ = ChannelId::parse(ChannelKind::Mailbox, &text);
    let _ = OrganizationId::parse(&text);
    check_email_address(&text);
    check_e164(&text);
    let mut size = [0u8; 4];
    for (slot, byte) in size.iter_mut().zip(rest) {
        *slot = *byte;
    }
    check_page_size(i32::from_le_bytes(size));
    check_resume(&text);
    check_round_trip(selector, rest, &text);

    let mut metadata = MetadataMap::new();
    let header = if selector % 2 == 0 {
        "authorization"
    } else {
        "x-organization-id"
    };
    // Raw bytes, as a client may send them: not necessarily UTF-8 or ASCII.
    if let Ok(value) = MetadataValue::try_from(rest) {
        metadata.insert(header, value);
    }
    if selector % 3 == 0
        && let Ok(value) = MetadataValue::try_from(format!("Bearer {text}").as_bytes())
    {
        metadata.append("authorization", value);
    }
    let authenticator = &authenticators()[usize::from(selector % 4 >= 2)];
    match authenticator.authenticate(&metadata) {
        Ok(_)
        | Err(ServiceError::Unauthenticated(_))
        | Err(ServiceError::OrganizationIdMissing(_)) => {}
        Err(other) => panic!("authentication answered {other:?}"),
    }
});
