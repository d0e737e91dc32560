//! Applications: named, versioned sets of interfaces whose async methods and event handlers
//! serve a peer's calls and events.
//!
//! ```
//! use tether::{Application, Interface, RemoteError, Value};
//!
//! let app = Application::new("calc", "1.0.0")
//!     .unwrap()
//!     .interface(
//!         "calculator",
//!         Interface::new()
//!             .method("answer", |_conn, _args| async { Ok(Value::from(42)) })
//!             .method("divide", |_conn, args| async move {
//!                 let a = args.first().and_then(Value::as_f64).unwrap_or(0.0);
//!                 let b = args.get(1).and_then(Value::as_f64).unwrap_or(0.0);
//!                 if b == 0.0 {
//!                     return Err(RemoteError::new(1, "Zero division"));
//!                 }
//!                 Ok(Value::from(a / b))
//!             }),
//!     );
//! assert_eq!(app.methods("calculator").unwrap(), vec!["answer", "divide"]);
//! ```

use crate::connection::Connection;
use crate::error::{Error, RemoteError};
use futures::future::BoxFuture;
use semver::{Version, VersionReq};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use tether_wire::{ErrorCode, Value};

/// What a method resolves to: a result value (`Value::Undefined` for "no result", which goes on
/// the wire as `ok:[]`) or an error sent as `error:[code, …]`.
pub type MethodResult = Result<Value, RemoteError>;

type MethodFn =
    Arc<dyn Fn(Connection, Vec<Value>) -> BoxFuture<'static, MethodResult> + Send + Sync>;
type EventFn = Arc<dyn Fn(Connection, Vec<Value>) + Send + Sync>;

/// One interface: methods (in definition order, which `inspect` reports) and event handlers.
#[derive(Clone, Default)]
pub struct Interface {
    methods: Vec<(String, MethodFn)>,
    events: HashMap<String, EventFn>,
}

impl std::fmt::Debug for Interface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interface")
            .field(
                "methods",
                &self.methods.iter().map(|m| &m.0).collect::<Vec<_>>(),
            )
            .field("events", &self.events.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Interface {
    /// An empty interface.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) an async method. It receives the calling connection and the call's
    /// arguments.
    pub fn method<F, Fut>(mut self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(Connection, Vec<Value>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = MethodResult> + Send + 'static,
    {
        let name = name.into();
        let f: MethodFn = Arc::new(move |c, a| Box::pin(f(c, a)));
        if let Some(slot) = self.methods.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = f;
        } else {
            self.methods.push((name, f));
        }
        self
    }

    /// Adds (or replaces) a method that runs on a task of its own. Methods normally start on
    /// their connection's task, in arrival order, which is what keeps a connection's calls and
    /// their side effects ordered; a CPU-heavy or long method that should not hold the
    /// connection's other calls up opts out here. Its synchronous part still starts in
    /// order; its answer comes when it finishes (a panic answers `[16]`).
    pub fn spawned_method<F, Fut>(self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(Connection, Vec<Value>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = MethodResult> + Send + 'static,
    {
        self.method(name, move |conn, args| {
            let task = tokio::spawn(f(conn, args));
            async move {
                task.await.unwrap_or_else(|_| {
                    Err(RemoteError::code(tether_wire::ErrorCode::InternalApiError))
                })
            }
        })
    }

    /// Adds (or replaces) a method whose body blocks (file IO, a C library, heavy CPU): it runs
    /// on tokio's blocking pool, so neither its connection nor the runtime's workers wait for
    /// it. A panic answers `[16]`.
    pub fn blocking_method<F>(self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(Connection, Vec<Value>) -> MethodResult + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        self.method(name, move |conn, args| {
            let f = f.clone();
            let task = tokio::task::spawn_blocking(move || f(conn, args));
            async move {
                task.await.unwrap_or_else(|_| {
                    Err(RemoteError::code(tether_wire::ErrorCode::InternalApiError))
                })
            }
        })
    }

    /// Adds a handler for an incoming event on this interface.
    pub fn on_event<F>(mut self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(Connection, Vec<Value>) + Send + Sync + 'static,
    {
        self.events.insert(name.into(), Arc::new(f));
        self
    }

    /// Adds (or replaces) a method with typed arguments and result: `A` is a tuple (or `()`)
    /// whose length is the method's arity, `R` anything `Serialize`. Arguments that do not
    /// convert — a wrong count or a wrong type — answer `[17]` invalid signature, as
    /// `@metarhia/jstp` answers a call of the wrong arity, with the failing argument and why as
    /// the error's info (see [`crate::typed::signature_reason`]). A result that does not convert (a non-finite number, an integer past
    /// 2^53 − 1) answers `[16]` internal API error and is logged here, not sent.
    ///
    /// ```
    /// use tether::{Interface, RemoteError};
    ///
    /// let iface = Interface::new()
    ///     .typed_method("divide", |_conn, (a, b): (f64, f64)| async move {
    ///         Ok::<f64, RemoteError>(a / b)
    ///     })
    ///     .typed_method("answer", |_conn, (): ()| async { Ok::<u8, RemoteError>(42) });
    /// assert_eq!(iface.method_names(), vec!["divide", "answer"]);
    /// ```
    pub fn typed_method<A, R, F, Fut>(self, name: impl Into<String>, f: F) -> Self
    where
        A: DeserializeOwned,
        R: Serialize,
        F: Fn(Connection, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, RemoteError>> + Send + 'static,
    {
        let name = name.into();
        let method = name.clone();
        self.method(name, move |conn, args| {
            let started = tether_wire::from_args::<A>(args).map(|args| f(conn, args));
            let method = method.clone();
            async move {
                let result = started.map_err(crate::typed::invalid_signature)?.await?;
                tether_wire::to_value(&result).map_err(|e| {
                    tracing::warn!(method, error = %e, "a typed method's result does not convert");
                    RemoteError::code(ErrorCode::InternalApiError)
                })
            }
        })
    }

    /// Adds a handler for an incoming event whose arguments convert to `A` (a tuple, or `()`).
    /// An event whose arguments do not convert has no one to answer: it is logged and the
    /// handler is not run.
    pub fn on_typed_event<A, F>(self, name: impl Into<String>, f: F) -> Self
    where
        A: DeserializeOwned,
        F: Fn(Connection, A) + Send + Sync + 'static,
    {
        let name = name.into();
        let event = name.clone();
        self.on_event(name, move |conn, args| {
            match tether_wire::from_args::<A>(args) {
                Ok(args) => f(conn, args),
                Err(e) => tracing::warn!(
                    event,
                    error = %crate::typed::describe_args_error(&e),
                    "an event's arguments do not convert; its handler did not run"
                ),
            }
        })
    }

    /// Method names, in definition order.
    pub fn method_names(&self) -> Vec<String> {
        self.methods.iter().map(|(n, _)| n.clone()).collect()
    }

    fn find(&self, name: &str) -> Option<&MethodFn> {
        self.methods.iter().find(|(n, _)| n == name).map(|(_, f)| f)
    }
}

/// A named, versioned application: `name@version` with its interfaces.
#[derive(Clone, Debug)]
pub struct Application {
    name: String,
    version: Version,
    interfaces: HashMap<String, Interface>,
}

impl Application {
    /// An application with no interfaces. `version` must be valid semver (upstream's default is
    /// `1.0.0`). A name may not contain `@`, because clients split `name@range` at the last `@`.
    pub fn new(name: impl Into<String>, version: &str) -> Result<Self, Error> {
        let name = name.into();
        if name.is_empty() || name.contains('@') {
            return Err(Error::InvalidArgument(format!(
                "invalid application name {name:?}"
            )));
        }
        let version =
            Version::parse(version).map_err(|_| Error::InvalidVersion(version.to_owned()))?;
        Ok(Application {
            name,
            version,
            interfaces: HashMap::new(),
        })
    }

    /// Parses `name@version` (or a bare name, version 1.0.0).
    pub fn from_spec(spec: &str) -> Result<Self, Error> {
        match spec.rsplit_once('@') {
            Some((name, version)) => Application::new(name, version),
            None => Application::new(spec, "1.0.0"),
        }
    }

    /// The default client-side application upstream uses: `jstp@1.0.0`, no interfaces.
    pub fn client_default() -> Self {
        Application::new("jstp", "1.0.0").expect("valid constant")
    }

    /// The same interfaces under another version (to offer several versions of one API).
    pub fn with_version(mut self, version: &str) -> Result<Self, Error> {
        self.version =
            Version::parse(version).map_err(|_| Error::InvalidVersion(version.to_owned()))?;
        Ok(self)
    }

    /// Adds (or replaces) an interface.
    pub fn interface(mut self, name: impl Into<String>, iface: Interface) -> Self {
        self.interfaces.insert(name.into(), iface);
        self
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version.
    pub fn version(&self) -> &Version {
        &self.version
    }

    /// The method names of an interface, or `None` if there is no such interface.
    pub fn methods(&self, iface: &str) -> Option<Vec<String>> {
        self.interfaces.get(iface).map(Interface::method_names)
    }

    /// Runs a method: unknown interface → 12, unknown method → 14.
    pub(crate) fn call(
        &self,
        conn: Connection,
        iface: &str,
        method: &str,
        args: Vec<Value>,
    ) -> Result<BoxFuture<'static, MethodResult>, RemoteError> {
        let i = self
            .interfaces
            .get(iface)
            .ok_or_else(|| RemoteError::code(ErrorCode::InterfaceNotFound))?;
        let f = i
            .find(method)
            .ok_or_else(|| RemoteError::code(ErrorCode::MethodNotFound))?;
        Ok(f(conn, args))
    }

    /// Runs the handler for an incoming event, if there is one. Returns whether one ran.
    pub(crate) fn handle_event(
        &self,
        conn: Connection,
        iface: &str,
        event: &str,
        args: Vec<Value>,
    ) -> bool {
        match self.interfaces.get(iface).and_then(|i| i.events.get(event)) {
            Some(h) => {
                h(conn, args);
                true
            }
            None => false,
        }
    }
}

/// The applications a server offers, indexed for handshake-time version resolution.
#[derive(Clone, Debug, Default)]
pub struct AppRegistry {
    /// name → versions, newest first.
    apps: HashMap<String, Vec<Arc<Application>>>,
}

impl AppRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an application; the same name and version twice is an error, as upstream.
    pub fn add(&mut self, app: Application) -> Result<(), Error> {
        let list = self.apps.entry(app.name.clone()).or_default();
        if list.iter().any(|a| a.version == app.version) {
            return Err(Error::InvalidArgument(format!(
                "duplicate application {}@{}",
                app.name, app.version
            )));
        }
        list.push(Arc::new(app));
        list.sort_by(|a, b| b.version.cmp(&a.version));
        Ok(())
    }

    /// All applications.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Application>> {
        self.apps.values().flatten()
    }

    /// Resolves a handshake's `name` and optional `version` as upstream does: no version → the
    /// latest; a valid version → that exact version; anything else → the highest version
    /// satisfying it as an npm-style range; an invalid range → none.
    pub fn resolve(&self, name: &str, version: Option<&str>) -> Option<Arc<Application>> {
        let list = self.apps.get(name)?;
        let Some(requested) = version else {
            return list.first().cloned();
        };
        if let Ok(exact) = Version::parse(requested) {
            return list.iter().find(|a| a.version == exact).cloned();
        }
        let range = NpmRange::parse(requested)?;
        list.iter().find(|a| range.matches(&a.version)).cloned()
    }
}

/// An npm-style semver range: alternatives joined by `||`, each a set of space-separated
/// comparators or a hyphen range; translated onto the `semver` crate's comparators.
#[derive(Debug, Clone)]
pub struct NpmRange {
    alternatives: Vec<VersionReq>,
}

impl NpmRange {
    /// Parses a range, or `None` when it is not a valid range.
    pub fn parse(range: &str) -> Option<NpmRange> {
        let mut alternatives = Vec::new();
        for alt in range.split("||") {
            let alt = alt.trim();
            let req = if alt.is_empty() || alt == "*" || alt.eq_ignore_ascii_case("x") {
                VersionReq::STAR
            } else if let Some((lo, hi)) = alt.split_once(" - ") {
                VersionReq::parse(&format!(">={}, {}", lo.trim(), hyphen_upper(hi.trim())?)).ok()?
            } else {
                let parts: Vec<String> = alt
                    .split_whitespace()
                    .map(npm_comparator)
                    .collect::<Option<_>>()?;
                VersionReq::parse(&parts.join(", ")).ok()?
            };
            alternatives.push(req);
        }
        Some(NpmRange { alternatives })
    }

    /// Whether `v` satisfies the range.
    pub fn matches(&self, v: &Version) -> bool {
        self.alternatives.iter().any(|r| r.matches(v))
    }
}

/// npm treats a bare partial version (`1`, `1.2`) as `1.x`/`1.2.x` and a full one as exact,
/// where the `semver` crate would read a bare version as a caret requirement.
fn npm_comparator(c: &str) -> Option<String> {
    let starts_with_op = c.starts_with(['^', '~', '>', '<', '=']);
    if starts_with_op {
        return Some(c.to_owned());
    }
    let c = c.trim_start_matches('v');
    let dots = c.split('.').count();
    let has_wild = c.split('.').any(|p| p == "x" || p == "X" || p == "*");
    if dots == 3 && !has_wild {
        Some(format!("={c}"))
    } else {
        // `1`, `1.2`, `1.x` → the semver crate's wildcard forms mean the same as npm's.
        let parts: Vec<&str> = c
            .split('.')
            .map(|p| if p == "x" || p == "X" { "*" } else { p })
            .collect();
        let mut s = parts.join(".");
        if !has_wild {
            s.push_str(".*");
        }
        Some(s)
    }
}

fn hyphen_upper(hi: &str) -> Option<String> {
    let parts: Vec<&str> = hi.split('.').collect();
    Some(match parts.len() {
        1 => format!("<{}.0.0", parts[0].parse::<u64>().ok()? + 1),
        2 => format!("<{}.{}.0", parts[0], parts[1].parse::<u64>().ok()? + 1),
        _ => format!("<={hi}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> AppRegistry {
        let mut r = AppRegistry::new();
        r.add(Application::new("testApp", "1.0.0").unwrap())
            .unwrap();
        r.add(Application::new("testApp", "2.0.0").unwrap())
            .unwrap();
        r
    }

    fn resolved(r: &AppRegistry, v: Option<&str>) -> Option<String> {
        r.resolve("testApp", v).map(|a| a.version().to_string())
    }

    #[test]
    fn resolves_like_upstream_api_versions_test() {
        let r = registry();
        assert_eq!(resolved(&r, None).as_deref(), Some("2.0.0"));
        assert_eq!(resolved(&r, Some("1")).as_deref(), Some("1.0.0"));
        assert_eq!(resolved(&r, Some("2")).as_deref(), Some("2.0.0"));
        assert_eq!(resolved(&r, Some("^1.0.0")).as_deref(), Some("1.0.0"));
        assert_eq!(resolved(&r, Some(">1.0.0")).as_deref(), Some("2.0.0"));
        assert_eq!(resolved(&r, Some("9999")), None);
        assert_eq!(resolved(&r, Some("__invalid__")), None);
        assert_eq!(resolved(&r, Some("1.0.0")).as_deref(), Some("1.0.0"));
        assert_eq!(resolved(&r, Some("1.0.1")), None);
        assert_eq!(resolved(&r, Some("1.x")).as_deref(), Some("1.0.0"));
        assert_eq!(
            resolved(&r, Some(">=1.0.0 <2.0.0")).as_deref(),
            Some("1.0.0")
        );
        assert_eq!(resolved(&r, Some("1.0.0 - 1.5")).as_deref(), Some("1.0.0"));
        assert_eq!(resolved(&r, Some("~1 || ^2.0.0")).as_deref(), Some("2.0.0"));
        assert_eq!(resolved(&r, Some("*")).as_deref(), Some("2.0.0"));
        assert!(r.resolve("other", None).is_none());
    }

    #[test]
    fn duplicate_versions_are_refused() {
        let mut r = registry();
        assert!(r
            .add(Application::new("testApp", "1.0.0").unwrap())
            .is_err());
    }

    #[test]
    fn names_and_versions_are_validated() {
        assert!(Application::new("a@b", "1.0.0").is_err());
        assert!(Application::new("a", "1.0").is_err());
        let app = Application::from_spec("chat@2.1.0").unwrap();
        assert_eq!(
            (app.name(), app.version().to_string().as_str()),
            ("chat", "2.1.0")
        );
    }
}
