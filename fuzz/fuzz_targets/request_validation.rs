//! Everything a caller controls before a query runs: the metadata the
//! organization is read from (bearer token, trusted header) and the request's
//! fields. None of it may panic, and every refusal must be one the contract
//! names.
#![no_main]

use std::sync::OnceLock;

use channel_assignment::{
    auth::Authenticator,
    config::AuthSettings,
    domain::{AgentHandle, ChannelId, ChannelKind, OrganizationId},
    error::ServiceError,
};
use libfuzzer_sys::fuzz_target;
use tonic::metadata::{MetadataMap, MetadataValue};

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
    if selector % 3 == 0 {
        if let Ok(value) = MetadataValue::try_from(format!("Bearer {text}").as_bytes()) {
            metadata.append("authorization", value);
        }
    }
    let authenticator = &authenticators()[usize::from(selector % 4 >= 2)];
    match authenticator.authenticate(&metadata) {
        Ok(_)
        | Err(ServiceError::Unauthenticated(_))
        | Err(ServiceError::OrganizationIdMissing) => {}
        Err(other) => panic!("authentication answered {other:?}"),
    }
});
