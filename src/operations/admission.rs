//! Which requests get to do database work now: at most `server` of them in
//! all, and at most `per_organization` of one organization, so that one
//! tenant's flood cannot take the capacity every other tenant needs. A
//! request over either limit is refused at once (RESOURCE_EXHAUSTED with
//! RetryInfo) rather than queued: queueing without bound only turns overload
//! into timeouts for everyone.
//!
//! The share is a concurrency limit, not a rate: capacity here is requests
//! in flight (each holds a database connection or waits for one), so a cap on
//! what one organization holds at a time protects the others whatever its
//! requests cost.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::domain::OrganizationId;
use crate::error::ServiceError;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Admission {
    server: Arc<Semaphore>,
    organizations: Arc<OrganizationShares>,
    metrics: Arc<Metrics>,
}

struct OrganizationShares {
    limit: usize,
    /// Requests in flight per organization; an organization with none has
    /// no entry, so the map is never larger than the server's limit.
    in_flight: Mutex<HashMap<OrganizationId, usize>>,
}

/// A place among the requests doing database work, given back when dropped.
pub struct Admitted {
    _server: OwnedSemaphorePermit,
    organization: OrganizationId,
    shares: Arc<OrganizationShares>,
}

impl Admission {
    pub fn new(server_limit: usize, per_organization: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            server: Arc::new(Semaphore::new(server_limit)),
            organizations: Arc::new(OrganizationShares {
                limit: per_organization,
                in_flight: Mutex::default(),
            }),
            metrics,
        }
    }

    pub fn admit(&self, organization: &OrganizationId) -> Result<Admitted, ServiceError> {
        let mut in_flight = self.organizations.lock();
        let held = in_flight.get(organization).copied().unwrap_or(0);
        if held >= self.organizations.limit {
            self.metrics.request_shed("organization");
            return Err(ServiceError::OrganizationOverloaded);
        }
        let Ok(server) = Arc::clone(&self.server).try_acquire_owned() else {
            self.metrics.request_shed("server");
            return Err(ServiceError::Overloaded);
        };
        in_flight.insert(organization.clone(), held + 1);
        Ok(Admitted {
            _server: server,
            organization: organization.clone(),
            shares: Arc::clone(&self.organizations),
        })
    }
}

impl OrganizationShares {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<OrganizationId, usize>> {
        // The map holds plain counts, consistent after any panic.
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut in_flight = self.shares.lock();
        if let Some(held) = in_flight.get_mut(&self.organization) {
            *held -= 1;
            if *held == 0 {
                in_flight.remove(&self.organization);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn org(name: &str) -> OrganizationId {
        OrganizationId::parse(name).unwrap()
    }

    #[test]
    fn one_organization_cannot_take_more_than_its_share() {
        let admission = Admission::new(4, 2, Metrics::new(1));
        let a = org("org_a");
        let first = admission.admit(&a).unwrap();
        let _second = admission.admit(&a).unwrap();
        assert!(matches!(
            admission.admit(&a),
            Err(ServiceError::OrganizationOverloaded)
        ));
        // Another organization still gets the rest of the server's places.
        let b = org("org_b");
        let _b1 = admission.admit(&b).unwrap();
        let _b2 = admission.admit(&b).unwrap();
        assert!(matches!(
            admission.admit(&org("org_c")),
            Err(ServiceError::Overloaded)
        ));
        drop(first);
        let _again = admission.admit(&a).unwrap();
    }

    #[test]
    fn organizations_with_nothing_in_flight_are_forgotten() {
        let admission = Admission::new(8, 8, Metrics::new(1));
        for i in 0..100 {
            drop(admission.admit(&org(&format!("org_{i}"))).unwrap());
        }
        assert!(admission.organizations.lock().is_empty());
    }
}
