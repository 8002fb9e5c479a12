//! The services a runtime hands to its tasks: the four extension services and user services.

use std::any::{Any, TypeId, type_name};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::extensions::{LoadManager, SagaCoordinator, Scheduler, Supervisor};
use crate::{Error, Result};

type AnyService = Arc<dyn Any + Send + Sync>;

/// The services of a runtime. Cheap to clone.
#[derive(Clone, Default)]
pub struct Services(Arc<ServiceRegistry>);

impl fmt::Debug for Services {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The mutable registry a runtime builder fills; frozen into [`Services`] at start.
#[derive(Clone, Default)]
pub struct ServiceRegistry {
    pub(crate) saga_coordinator: Option<Arc<dyn SagaCoordinator>>,
    pub(crate) scheduler: Option<Arc<dyn Scheduler>>,
    pub(crate) supervisor: Option<Arc<dyn Supervisor>>,
    pub(crate) load_manager: Option<Arc<dyn LoadManager>>,
    by_type: HashMap<TypeId, AnyService>,
    by_name: HashMap<String, AnyService>,
}

impl fmt::Debug for ServiceRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Services")
            .field("saga_coordinator", &self.saga_coordinator.is_some())
            .field("scheduler", &self.scheduler.is_some())
            .field("supervisor", &self.supervisor.is_some())
            .field("load_manager", &self.load_manager.is_some())
            .field("by_type", &self.by_type.len())
            .field("by_name", &self.by_name.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ServiceRegistry {
    /// Sets the saga coordinator.
    pub fn set_saga_coordinator(&mut self, s: Arc<dyn SagaCoordinator>) {
        self.saga_coordinator = Some(s);
    }
    /// Sets the scheduler.
    pub fn set_scheduler(&mut self, s: Arc<dyn Scheduler>) {
        self.scheduler = Some(s);
    }
    /// Sets the supervisor.
    pub fn set_supervisor(&mut self, s: Arc<dyn Supervisor>) {
        self.supervisor = Some(s);
    }
    /// Sets the load manager.
    pub fn set_load_manager(&mut self, s: Arc<dyn LoadManager>) {
        self.load_manager = Some(s);
    }
    /// Adds a user service, found again by its type.
    pub fn insert<T: Send + Sync + 'static>(&mut self, service: Arc<T>) {
        self.by_type.insert(TypeId::of::<T>(), service);
    }
    /// Adds a user service under a name.
    pub fn insert_named<T: Send + Sync + 'static>(&mut self, name: impl Into<String>, s: Arc<T>) {
        self.by_name.insert(name.into(), s);
    }
}

impl Services {
    pub(crate) fn freeze(registry: ServiceRegistry) -> Self {
        Self(Arc::new(registry))
    }

    /// The saga coordinator, or an error naming it when it is not configured.
    pub fn saga_coordinator(&self) -> Result<Arc<dyn SagaCoordinator>> {
        self.0
            .saga_coordinator
            .clone()
            .ok_or_else(|| Error::ServiceNotConfigured("saga-coordinator".into()))
    }

    /// The scheduler, or an error naming it.
    pub fn scheduler(&self) -> Result<Arc<dyn Scheduler>> {
        self.0
            .scheduler
            .clone()
            .ok_or_else(|| Error::ServiceNotConfigured("scheduler".into()))
    }

    /// The supervisor, or an error naming it.
    pub fn supervisor(&self) -> Result<Arc<dyn Supervisor>> {
        self.0
            .supervisor
            .clone()
            .ok_or_else(|| Error::ServiceNotConfigured("supervisor".into()))
    }

    /// The load manager, or an error naming it.
    pub fn load_manager(&self) -> Result<Arc<dyn LoadManager>> {
        self.0
            .load_manager
            .clone()
            .ok_or_else(|| Error::ServiceNotConfigured("load-manager".into()))
    }

    /// A user service by type.
    pub fn get<T: Send + Sync + 'static>(&self) -> Result<Arc<T>> {
        self.0
            .by_type
            .get(&TypeId::of::<T>())
            .cloned()
            .and_then(|s| s.downcast::<T>().ok())
            .ok_or_else(|| Error::ServiceNotConfigured(type_name::<T>().into()))
    }

    /// A user service by name (the original's `get_service(name)`), checked against its type.
    pub fn get_named<T: Send + Sync + 'static>(&self, name: &str) -> Result<Arc<T>> {
        self.0
            .by_name
            .get(name)
            .cloned()
            .and_then(|s| s.downcast::<T>().ok())
            .ok_or_else(|| Error::ServiceNotConfigured(name.into()))
    }
}
