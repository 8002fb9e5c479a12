//! A tower [`Layer`] that guards a service with a resource: one permit per request, the outcome
//! classified from the response, and a typed error when the circuit is open or the resource
//! full (feature `tower`).
//!
//! By default admission is decided in `call` without waiting, like tower's `LoadShed`: a refused
//! request fails at once with [`LoadError::Rejected`], so a caller can shed or retry elsewhere.
//! With [`LoadLayer::wait`], `poll_ready` waits for capacity (in the resource's bounded queue),
//! like `ConcurrencyLimit`, and still reports a refusal through the response future. The permit
//! lives in the response future: it is released when the response is ready, and also when the
//! future is dropped or its task panics, so no capacity leaks.
//!
//! ```
//! use std::convert::Infallible;
//! use architectlm_core::extensions::loadmanager::ResourceType;
//! use architectlm_loadmanager::tower::{LoadError, LoadLayer};
//! use architectlm_loadmanager::{LoadManager, Rejected, ResourceSettings};
//! use tower::{Layer, Service, ServiceExt, service_fn};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let manager = LoadManager::new();
//! let api = manager
//!     .register(ResourceSettings::builder("api", ResourceType::Api, 1).build().unwrap())
//!     .unwrap();
//! api.force_open();
//! let mut svc = LoadLayer::new(api).layer(service_fn(|x: u32| async move { Ok::<_, Infallible>(x * 2) }));
//! let err = svc.ready().await.unwrap().call(21).await.unwrap_err();
//! assert!(matches!(err, LoadError::Rejected(Rejected::ForcedOpen)));
//! # });
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use architectlm_core::extensions::loadmanager::{CallOutcome, ResourcePermit};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::resource::{Rejected, Resource};

/// Decides the outcome of a call from its result.
///
/// Implemented by [`DefaultClassifier`] and by any `Fn(&Result<T, E>) -> CallOutcome + Clone`.
pub trait Classify<T, E> {
    /// The outcome to record for `result`.
    fn classify(&self, result: &Result<T, E>) -> CallOutcome;
}

/// `Ok` is a success, `Err` a failure.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassifier;

impl<T, E> Classify<T, E> for DefaultClassifier {
    fn classify(&self, result: &Result<T, E>) -> CallOutcome {
        if result.is_ok() {
            CallOutcome::Success
        } else {
            CallOutcome::Failure
        }
    }
}

impl<T, E, F> Classify<T, E> for F
where
    F: Fn(&Result<T, E>) -> CallOutcome,
{
    fn classify(&self, result: &Result<T, E>) -> CallOutcome {
        self(result)
    }
}

/// The error of a guarded service.
#[derive(Debug)]
pub enum LoadError<E> {
    /// The resource refused the request; the inner service was not called.
    Rejected(Rejected),
    /// The inner service failed.
    Service(E),
}

impl<E: fmt::Display> fmt::Display for LoadError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rejected(r) => write!(f, "request refused: {r}"),
            Self::Service(e) => e.fmt(f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for LoadError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Rejected(r) => Some(r),
            Self::Service(e) => Some(e),
        }
    }
}

/// Guards services with a [`Resource`]. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct LoadLayer<C = DefaultClassifier> {
    resource: Resource,
    units: u64,
    wait: Option<Duration>,
    classifier: C,
}

impl LoadLayer {
    /// One unit per request, `Ok` success and `Err` failure.
    pub fn new(resource: Resource) -> Self {
        Self {
            resource,
            units: 1,
            wait: None,
            classifier: DefaultClassifier,
        }
    }
}

impl<C> LoadLayer<C> {
    /// Units each request takes (default 1).
    pub fn units(mut self, units: u64) -> Self {
        self.units = units;
        self
    }

    /// Waits up to `wait` for capacity in `poll_ready` (in the resource's bounded queue), like
    /// tower's `ConcurrencyLimit`, instead of refusing at once. A refusal is still reported
    /// by the response future, never as a `poll_ready` error, so the service stays usable.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Classifies responses with `classifier`, for example to count HTTP 5xx as failures.
    pub fn classifier<C2>(self, classifier: C2) -> LoadLayer<C2> {
        LoadLayer {
            resource: self.resource,
            units: self.units,
            wait: self.wait,
            classifier,
        }
    }
}

impl<S, C: Clone> Layer<S> for LoadLayer<C> {
    type Service = LoadService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        LoadService {
            inner,
            wait: self.wait,
            reserved: None,
            waiting: None,
            resource: self.resource.clone(),
            units: self.units,
            classifier: self.classifier.clone(),
        }
    }
}

type Waiting = Pin<Box<dyn Future<Output = Result<ResourcePermit, Rejected>> + Send>>;

/// A service guarded by a resource. Built by [`LoadLayer`].
///
/// With a [`wait`](LoadLayer::wait), `poll_ready` reserves the permit (waiting for capacity)
/// and `call` uses it; a clone starts without a reservation.
pub struct LoadService<S, C = DefaultClassifier> {
    inner: S,
    resource: Resource,
    units: u64,
    wait: Option<Duration>,
    /// A permit taken in `poll_ready`, or why none could be.
    reserved: Option<Result<ResourcePermit, Rejected>>,
    /// The wait for capacity in progress (allocated only when capacity is short).
    waiting: Option<Waiting>,
    classifier: C,
}

impl<S: fmt::Debug, C> fmt::Debug for LoadService<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadService")
            .field("inner", &self.inner)
            .field("resource", &self.resource)
            .field("units", &self.units)
            .field("wait", &self.wait)
            .field("reserved", &self.reserved)
            .field("waiting", &self.waiting.is_some())
            .finish()
    }
}

impl<S: Clone, C: Clone> Clone for LoadService<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            resource: self.resource.clone(),
            units: self.units,
            wait: self.wait,
            reserved: None,
            waiting: None,
            classifier: self.classifier.clone(),
        }
    }
}

impl<S, C> LoadService<S, C> {
    /// The resource guarding the service.
    pub fn resource(&self) -> &Resource {
        &self.resource
    }
}

impl<S, C, Req> Service<Req> for LoadService<S, C>
where
    S: Service<Req>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = LoadError<S::Error>;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if let (Some(wait), None) = (self.wait, &self.reserved) {
            if self.waiting.is_none() {
                match self.resource.try_acquire_owned(self.units) {
                    Err(Rejected::CapacityFull) => {
                        let (resource, units) = (self.resource.clone(), self.units);
                        self.waiting = Some(Box::pin(async move {
                            resource.acquire_owned(units, wait).await
                        }));
                    }
                    other => self.reserved = Some(other),
                }
            }
            if let Some(w) = self.waiting.as_mut() {
                let got = ready!(w.as_mut().poll(cx));
                self.waiting = None;
                self.reserved = Some(got);
            }
        }
        self.inner.poll_ready(cx).map_err(LoadError::Service)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let admitted = match self.reserved.take() {
            Some(r) => r,
            None => self.resource.try_acquire_owned(self.units),
        };
        match admitted {
            Ok(permit) => ResponseFuture {
                inner: Some(self.inner.call(req)),
                permit: Some(permit),
                rejected: None,
                classifier: self.classifier.clone(),
            },
            Err(r) => ResponseFuture {
                inner: None,
                permit: None,
                rejected: Some(r),
                classifier: self.classifier.clone(),
            },
        }
    }
}

pin_project! {
    /// The response future of a [`LoadService`]; holds the permit until the response is ready.
    pub struct ResponseFuture<F, C> {
        #[pin]
        inner: Option<F>,
        permit: Option<ResourcePermit>,
        rejected: Option<Rejected>,
        classifier: C,
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("permit", &self.permit)
            .field("rejected", &self.rejected)
            .finish()
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    C: Classify<T, E>,
{
    type Output = Result<T, LoadError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.inner.as_pin_mut() {
            None => Poll::Ready(Err(LoadError::Rejected(
                this.rejected.take().unwrap_or(Rejected::CircuitOpen),
            ))),
            Some(fut) => {
                let result = ready!(fut.poll(cx));
                let outcome = this.classifier.classify(&result);
                if let Some(p) = this.permit.take() {
                    p.complete(outcome);
                }
                Poll::Ready(result.map_err(LoadError::Service))
            }
        }
    }
}
