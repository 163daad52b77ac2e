//! Pages of lists: the size a caller may ask for, and opaque page tokens
//! that cannot be altered or used for another organization or list.
//!
//! A token carries the list's position (the last key of the page it
//! follows) and an HMAC-SHA256 over the organization, the list, its filter
//! and the position, so the server needs no state to resume a list, and a
//! token that was altered, or replayed elsewhere, is refused.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use uuid::Uuid;

use crate::domain::OrganizationId;
use crate::error::{FieldViolation, ServiceError};
use crate::store::ListCursor;

pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 1000;

const VERSION: u8 = 1;
/// Bytes of the MAC kept in a token: 128 bits, far beyond guessing.
const MAC_LEN: usize = 16;

/// The lists that page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum List {
    Identities,
    Mailboxes { unassigned_only: bool },
    PhoneNumbers { unassigned_only: bool },
}

impl List {
    fn tag(self) -> [u8; 2] {
        match self {
            Self::Identities => [1, 0],
            Self::Mailboxes { unassigned_only } => [2, u8::from(unassigned_only)],
            Self::PhoneNumbers { unassigned_only } => [3, u8::from(unassigned_only)],
        }
    }
}

/// `page_size` as callers send it: 0 means the default, above the maximum
/// means the maximum, negative is invalid.
pub fn page_size(raw: i32) -> Result<usize, FieldViolation> {
    match usize::try_from(raw) {
        Err(_) => Err(FieldViolation {
            field: "page_size",
            description: "page_size must not be negative".to_owned(),
        }),
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(size) => Ok(size.min(MAX_PAGE_SIZE)),
    }
}

/// Signs and checks page tokens with the server's key.
#[derive(Clone)]
pub struct PageTokens {
    key: Vec<u8>,
}

impl PageTokens {
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        Self { key: key.into() }
    }

    pub fn issue(&self, organization: &OrganizationId, list: List, after: &ListCursor) -> String {
        let mut token = vec![VERSION];
        token.extend_from_slice(&list.tag());
        token.extend_from_slice(&cursor_bytes(after));
        let mac = self.mac(organization, &token);
        token.extend_from_slice(&mac);
        URL_SAFE_NO_PAD.encode(token)
    }

    /// The position a token resumes from; `None` for the first page (an
    /// empty token).
    pub fn resume(
        &self,
        organization: &OrganizationId,
        list: List,
        token: &str,
    ) -> Result<Option<ListCursor>, FieldViolation> {
        if token.is_empty() {
            return Ok(None);
        }
        let invalid = || FieldViolation {
            field: "page_token",
            description: "page_token is not one this list issued to the caller".to_owned(),
        };
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
        if bytes.len() < 3 + MAC_LEN {
            return Err(invalid());
        }
        let (signed, mac) = bytes.split_at(bytes.len() - MAC_LEN);
        let mut verifier = self.hmac(organization);
        verifier.update(signed);
        // Constant-time comparison of the truncated MAC.
        verifier.verify_truncated_left(mac).map_err(|_| invalid())?;
        if signed[0] != VERSION || signed[1..3] != list.tag() {
            return Err(invalid());
        }
        let position = &signed[3..];
        let cursor = match list {
            List::Identities => String::from_utf8(position.to_vec())
                .map(ListCursor::Handle)
                .map_err(|_| invalid())?,
            List::Mailboxes { .. } | List::PhoneNumbers { .. } => Uuid::from_slice(position)
                .map(ListCursor::Id)
                .map_err(|_| invalid())?,
        };
        Ok(Some(cursor))
    }

    fn hmac(&self, organization: &OrganizationId) -> Hmac<Sha256> {
        // Any key length is valid for HMAC.
        let mut mac = <Hmac<Sha256> as hmac::Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(organization.as_str().as_bytes());
        // Organization ids cannot contain NUL: the boundary is unambiguous.
        mac.update(&[0]);
        mac
    }

    fn mac(&self, organization: &OrganizationId, signed: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = self.hmac(organization);
        mac.update(signed);
        let full = mac.finalize().into_bytes();
        let mut truncated = [0; MAC_LEN];
        truncated.copy_from_slice(&full[..MAC_LEN]);
        truncated
    }
}

fn cursor_bytes(cursor: &ListCursor) -> Vec<u8> {
    match cursor {
        ListCursor::Handle(handle) => handle.as_bytes().to_vec(),
        ListCursor::Id(id) => id.as_bytes().to_vec(),
    }
}

impl From<FieldViolation> for ServiceError {
    fn from(violation: FieldViolation) -> Self {
        Self::InvalidArgument(vec![violation])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn org(raw: &str) -> OrganizationId {
        OrganizationId::parse(raw).unwrap()
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page_size(0).unwrap(), 50);
        assert_eq!(page_size(1).unwrap(), 1);
        assert_eq!(page_size(1000).unwrap(), 1000);
        assert_eq!(page_size(5000).unwrap(), 1000);
        assert_eq!(page_size(i32::MAX).unwrap(), 1000);
        assert_eq!(page_size(-1).unwrap_err().field, "page_size");
    }

    #[test]
    fn a_token_resumes_its_own_list_of_its_own_organization_only() {
        let tokens = PageTokens::new("key");
        let alpha = org("org_alpha");
        let cursor = ListCursor::Handle("sales-agent".into());
        let token = tokens.issue(&alpha, List::Identities, &cursor);
        assert_eq!(
            tokens.resume(&alpha, List::Identities, &token).unwrap(),
            Some(cursor)
        );
        assert_eq!(tokens.resume(&alpha, List::Identities, "").unwrap(), None);

        assert!(
            tokens
                .resume(&org("org_beta"), List::Identities, &token)
                .is_err()
        );
        let id = ListCursor::Id(Uuid::from_u128(7));
        let mailboxes = tokens.issue(
            &alpha,
            List::Mailboxes {
                unassigned_only: false,
            },
            &id,
        );
        assert!(
            tokens
                .resume(
                    &alpha,
                    List::Mailboxes {
                        unassigned_only: true
                    },
                    &mailboxes
                )
                .is_err()
        );
        assert!(
            tokens
                .resume(
                    &alpha,
                    List::PhoneNumbers {
                        unassigned_only: false
                    },
                    &mailboxes
                )
                .is_err()
        );
        assert!(
            PageTokens::new("other key")
                .resume(&alpha, List::Identities, &token)
                .is_err()
        );
    }

    proptest::proptest! {
        #[test]
        fn any_altered_token_is_refused(handle in "[a-z]{1,20}", byte in 0usize..64, bit in 0u8..8) {
            let tokens = PageTokens::new("key");
            let alpha = org("org_alpha");
            let token = tokens.issue(&alpha, List::Identities, &ListCursor::Handle(handle));
            let mut raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
            let byte = byte % raw.len();
            raw[byte] ^= 1 << bit;
            let altered = URL_SAFE_NO_PAD.encode(raw);
            proptest::prop_assert!(tokens.resume(&alpha, List::Identities, &altered).is_err());
        }

        #[test]
        fn any_text_is_a_position_or_a_refusal_never_a_panic(raw in ".{0,200}") {
            let _ = PageTokens::new("key").resume(&org("org_alpha"), List::Identities, &raw);
        }
    }
}
