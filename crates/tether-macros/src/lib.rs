//! One definition, both sides: `#[interface]` on a trait of `async fn`s gives the server a
//! [`tether::Interface`](../tether/struct.Interface.html) built from any implementation and the
//! caller a typed client, with the names the wire uses. Users reach it as `tether::interface`.
//!
//! ```
//! use tether::{Application, RemoteError};
//!
//! #[tether_macros::interface(name = "calculator")]
//! pub trait Calculator {
//!     async fn divide(&self, a: f64, b: f64) -> Result<f64, RemoteError>;
//!     #[tether(rename = "doNothing")]
//!     async fn do_nothing(&self) -> Result<(), RemoteError>;
//!     /// An event the server sends: `calculator.result(value)`.
//!     #[tether(emit)]
//!     fn result(value: f64);
//! }
//!
//! struct Calc;
//! impl Calculator for Calc {
//!     async fn divide(&self, a: f64, b: f64) -> Result<f64, RemoteError> {
//!         Ok(a / b)
//!     }
//!     async fn do_nothing(&self) -> Result<(), RemoteError> {
//!         Ok(())
//!     }
//! }
//!
//! // Server side: the implementation as an interface.
//! let app = Application::new("calc", "1.0.0")
//!     .unwrap()
//!     .interface(Calc::INTERFACE_NAME, Calc.into_interface());
//! assert_eq!(app.methods("calculator").unwrap(), vec!["divide", "doNothing"]);
//! // Client side: `CalculatorClient::new(conn).divide(20.0, 10.0).await?` is an `f64`, and
//! // `client.on_result()` a `Stream` of `(f64,)`; a server sends the event with
//! // `CalculatorEvents::emit_result(&conn, 2.0)` or `broadcast_result(&server, 2.0)`.
//! # let _ = (CalculatorClient::new, CalculatorEvents::result_args);
//! ```
//!
//! What it generates, for a trait `Calculator`:
//! - the trait itself, each `async fn` rewritten to return `impl Future + Send` (so servers can
//!   run it on any task; an implementation still writes `async fn`), plus
//!   `const INTERFACE_NAME` and `fn into_interface(self) -> tether::Interface`, which
//!   registers every method (arity and argument types are checked there: a mismatch answers
//!   JSTP's `[17]`, with the failing argument and why as the error's info) and every event
//!   handler;
//! - `CalculatorClient`, wrapping a `tether::Connection`, with one `async fn` per method
//!   returning `Result<T, tether::TypedError>`, one per event handler (sending that event),
//!   and `on_<event>()` giving a typed `tether::typed::EventStream` per event the server sends;
//! - `CalculatorEvents`, when the trait declares events the server sends: `<event>_args`,
//!   `emit_<event>` (one connection) and `broadcast_<event>` (every client of a server).
//!
//! The interface name defaults to the trait's name with its first letter lowercased
//! (`SomeService` → `someService`). On the trait: `name = "…"`, `crate = "…"` (the path of
//! the tether crate, `::tether` by default; `crate` inside tether itself), and
//! `signature_reason = false` to answer a bare `[17]`, byte for byte what `@metarhia/jstp`
//! sends. On an item, `#[tether(…)]` takes:
//! - `rename = "…"`: the wire name, when it is not the Rust name;
//! - `connection`: the method's (or event handler's) first argument after `&self` is the
//!   calling `tether::Connection`, not a wire argument (the client leaves it out);
//! - `event`: a plain `fn(&self, …)` with no result, run for each incoming event of that name;
//! - `raw`: the method (or event handler) takes the call's whole argument list as its one
//!   argument, `args: Vec<tether::Value>`, unchecked — the escape hatch for a JS-style method
//!   that accepts any argument count (the client passes the list as it is);
//! - `emit`: a declaration `fn name(args…);` (no `self`, no body) of an event the server
//!   sends; it is taken out of the trait.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;
use quote::{format_ident, quote};
use syn::spanned::Spanned;
use syn::{
    parse_macro_input, parse_quote, Attribute, FnArg, GenericArgument, Ident, ItemTrait, LitBool,
    LitStr, Pat, PathArguments, ReturnType, TraitItem, Type,
};

/// Turns a trait of `async fn(&self, …) -> Result<T, RemoteError>` methods (and event
/// handlers and event declarations) into a tether interface and a typed client. See the crate
/// documentation.
#[proc_macro_attribute]
pub fn interface(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut options = Options {
        name: None,
        krate: parse_quote!(::tether),
        signature_reason: true,
    };
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("name") {
            options.name = Some(meta.value()?.parse()?);
            Ok(())
        } else if meta.path.is_ident("crate") {
            let path: LitStr = meta.value()?.parse()?;
            options.krate = path.parse()?;
            Ok(())
        } else if meta.path.is_ident("signature_reason") {
            let on: LitBool = meta.value()?.parse()?;
            options.signature_reason = on.value;
            Ok(())
        } else {
            Err(meta
                .error("expected `name = \"…\"`, `crate = \"…\"` or `signature_reason = false`"))
        }
    });
    parse_macro_input!(attr with parser);
    let mut item = parse_macro_input!(item as ItemTrait);
    match expand(&mut item, options) {
        Ok(out) => out.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

struct Options {
    name: Option<LitStr>,
    krate: syn::Path,
    signature_reason: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `async fn(&self, …) -> Result<T, E>`: a method.
    Method,
    /// `fn(&self, …)`: an incoming event's handler.
    Event,
    /// `fn name(…);`: an event the server sends.
    Emit,
}

struct Item {
    kind: Kind,
    ident: Ident,
    wire: String,
    /// Whether the first argument after `&self` is the calling connection.
    connection: bool,
    /// Whether the one wire argument is the whole argument list.
    raw: bool,
    /// The wire arguments.
    args: Vec<(Ident, Type)>,
    /// `T` of the method's `Result<T, E>`.
    ok: Option<Type>,
    docs: Vec<Attribute>,
}

fn lower_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// `T` of a `Result<T, E>` return type.
fn ok_type(output: &ReturnType) -> syn::Result<Type> {
    let fail = |span| {
        syn::Error::new(
            span,
            "an #[interface] method returns `Result<T, RemoteError>`",
        )
    };
    let ReturnType::Type(_, ty) = output else {
        return Err(fail(output.span()));
    };
    let Type::Path(path) = &**ty else {
        return Err(fail(ty.span()));
    };
    let last = path.path.segments.last().ok_or_else(|| fail(ty.span()))?;
    if last.ident != "Result" {
        return Err(fail(ty.span()));
    }
    let PathArguments::AngleBracketed(generics) = &last.arguments else {
        return Err(fail(ty.span()));
    };
    match generics.args.first() {
        Some(GenericArgument::Type(ok)) if generics.args.len() == 2 => Ok(ok.clone()),
        _ => Err(fail(ty.span())),
    }
}

/// Reads and removes the item's `#[tether(…)]` attributes.
fn item_attributes(f: &mut syn::TraitItemFn) -> syn::Result<(String, Kind, bool, bool)> {
    let mut wire = f.sig.ident.to_string();
    let mut kind = Kind::Method;
    let mut connection = false;
    let mut raw = false;
    let mut attr_error = None;
    f.attrs.retain(|a| {
        if !a.path().is_ident("tether") {
            return true;
        }
        let parsed = a.parse_nested_meta(|meta| {
            if meta.path.is_ident("rename") {
                let name: LitStr = meta.value()?.parse()?;
                wire = name.value();
            } else if meta.path.is_ident("connection") {
                connection = true;
            } else if meta.path.is_ident("raw") {
                raw = true;
            } else if meta.path.is_ident("event") {
                kind = Kind::Event;
            } else if meta.path.is_ident("emit") {
                kind = Kind::Emit;
            } else {
                return Err(
                    meta.error("expected `rename = \"…\"`, `connection`, `raw`, `event` or `emit`")
                );
            }
            Ok(())
        });
        if let Err(e) = parsed {
            attr_error.get_or_insert(e);
        }
        false
    });
    match attr_error {
        Some(e) => Err(e),
        None if kind == Kind::Emit && (connection || raw) => Err(syn::Error::new(
            f.sig.ident.span(),
            "a #[tether(emit)] event is sent, not handled: it takes no connection and is not raw",
        )),
        None => Ok((wire, kind, connection, raw)),
    }
}

fn item(f: &mut syn::TraitItemFn) -> syn::Result<Item> {
    let (wire, kind, connection, raw) = item_attributes(f)?;
    let sig = &f.sig;
    match (kind, sig.asyncness.is_some()) {
        (Kind::Method, false) => {
            return Err(syn::Error::new(
                sig.fn_token.span(),
                "an #[interface] method must be an `async fn`",
            ))
        }
        (Kind::Event | Kind::Emit, true) => {
            return Err(syn::Error::new(
                sig.asyncness.span(),
                "an #[interface] event is a plain `fn` (a handler cannot answer)",
            ))
        }
        _ => {}
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "an #[interface] method cannot be generic: its types are what goes on the wire",
        ));
    }
    if let Some(body) = &f.default {
        return Err(syn::Error::new(
            body.span(),
            "an #[interface] method has no default body",
        ));
    }
    let mut inputs = sig.inputs.iter().peekable();
    if kind == Kind::Emit {
        if let Some(FnArg::Receiver(r)) = inputs.peek() {
            return Err(syn::Error::new(
                r.span(),
                "a #[tether(emit)] event is a declaration without `self`",
            ));
        }
    } else {
        match inputs.next() {
            Some(FnArg::Receiver(r)) if r.reference.is_some() && r.mutability.is_none() => {}
            _ => {
                return Err(syn::Error::new(
                    sig.ident.span(),
                    "an #[interface] method takes `&self` first",
                ))
            }
        }
        if connection && inputs.next().is_none() {
            return Err(syn::Error::new(
                sig.ident.span(),
                "#[tether(connection)] needs an argument after `&self` for the connection",
            ));
        }
    }
    let mut args = Vec::new();
    for input in inputs {
        let FnArg::Typed(arg) = input else {
            return Err(syn::Error::new(input.span(), "unexpected receiver"));
        };
        let Pat::Ident(name) = &*arg.pat else {
            return Err(syn::Error::new(
                arg.pat.span(),
                "an #[interface] method's arguments are plain names",
            ));
        };
        args.push((name.ident.clone(), (*arg.ty).clone()));
    }
    if raw && args.len() != 1 {
        return Err(syn::Error::new(
            sig.ident.span(),
            "a #[tether(raw)] method takes one argument, `args: Vec<tether::Value>`",
        ));
    }
    let ok = match kind {
        Kind::Method => Some(ok_type(&sig.output)?),
        Kind::Event | Kind::Emit => {
            if let ReturnType::Type(_, ty) = &sig.output {
                return Err(syn::Error::new(
                    ty.span(),
                    "an #[interface] event has no result",
                ));
            }
            None
        }
    };
    let docs = f
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .cloned()
        .collect();
    Ok(Item {
        kind,
        ident: sig.ident.clone(),
        wire,
        connection,
        raw,
        args,
        ok,
        docs,
    })
}

fn expand(item_trait: &mut ItemTrait, options: Options) -> syn::Result<TokenStream2> {
    let Options {
        name,
        krate,
        signature_reason,
    } = options;
    let iface = name.map_or_else(|| lower_first(&item_trait.ident.to_string()), |n| n.value());
    let mut items = Vec::new();
    let mut kept = Vec::new();
    for mut entry in std::mem::take(&mut item_trait.items) {
        let TraitItem::Fn(f) = &mut entry else {
            return Err(syn::Error::new(
                entry.span(),
                "an #[interface] trait holds only methods",
            ));
        };
        let parsed = item(f)?;
        if parsed.kind == Kind::Method {
            // A server runs methods on any task, so their futures must be `Send`.
            let ReturnType::Type(_, output) = &f.sig.output else {
                unreachable!("checked by ok_type")
            };
            let output = output.clone();
            f.sig.asyncness = None;
            f.sig.output = parse_quote!(
                -> impl ::core::future::Future<Output = #output> + ::core::marker::Send
            );
        }
        if parsed.kind != Kind::Emit {
            kept.push(entry);
        }
        items.push(parsed);
    }
    item_trait.items = kept;

    let reply = if signature_reason {
        quote!(#krate::typed::SignatureReply::Reason)
    } else {
        quote!(#krate::typed::SignatureReply::Bare)
    };
    let registrations = items.iter().filter(|m| m.kind != Kind::Emit).map(|m| {
        let ident = &m.ident;
        let wire = &m.wire;
        let names: Vec<_> = m.args.iter().map(|(n, _)| n).collect();
        let types: Vec<_> = m.args.iter().map(|(_, t)| t).collect();
        let (conn_pat, conn_arg) = if m.connection {
            (quote!(__tether_conn), quote!(__tether_conn,))
        } else {
            (quote!(_), quote!())
        };
        match (m.kind, m.raw) {
            (Kind::Method, true) => quote! {
                .method(#wire, #krate::typed::raw_method_handler(#wire, {
                    let __tether_this = ::std::sync::Arc::clone(&__tether_this);
                    move |#conn_pat: #krate::Connection, #(#names)*: ::std::vec::Vec<#krate::Value>| {
                        let __tether_this = ::std::sync::Arc::clone(&__tether_this);
                        async move { __tether_this.#ident(#conn_arg #(#names)*).await }
                    }
                }))
            },
            (Kind::Event, true) => quote! {
                .on_event(#wire, {
                    let __tether_this = ::std::sync::Arc::clone(&__tether_this);
                    move |#conn_pat: #krate::Connection, #(#names)*: ::std::vec::Vec<#krate::Value>| {
                        __tether_this.#ident(#conn_arg #(#names)*)
                    }
                })
            },
            (Kind::Method, false) => quote! {
                .method(#wire, #krate::typed::method_handler(#wire, #reply, {
                    let __tether_this = ::std::sync::Arc::clone(&__tether_this);
                    move |#conn_pat: #krate::Connection, (#(#names,)*): (#(#types,)*)| {
                        let __tether_this = ::std::sync::Arc::clone(&__tether_this);
                        async move { __tether_this.#ident(#conn_arg #(#names),*).await }
                    }
                }))
            },
            _ => quote! {
                .on_typed_event(#wire, {
                    let __tether_this = ::std::sync::Arc::clone(&__tether_this);
                    move |#conn_pat: #krate::Connection, (#(#names,)*): (#(#types,)*)| {
                        __tether_this.#ident(#conn_arg #(#names),*)
                    }
                })
            },
        }
    });
    item_trait.items.push(parse_quote! {
        /// The interface's name on the wire.
        const INTERFACE_NAME: &'static str = #iface;
    });
    item_trait.items.push(parse_quote! {
        /// This implementation as a tether interface: every method and event handler
        /// registered under its wire name with typed arguments (and result).
        fn into_interface(self) -> #krate::Interface
        where
            Self: ::core::marker::Sized + ::core::marker::Send + ::core::marker::Sync + 'static,
        {
            let __tether_this = ::std::sync::Arc::new(self);
            #krate::Interface::new() #(#registrations)*
        }
    });

    let vis = &item_trait.vis;
    let trait_ident = &item_trait.ident;
    let client = format_ident!("{}Client", trait_ident);
    let client_doc = format!("A typed client of the `{iface}` interface (see [`{trait_ident}`]).");
    let calls = items.iter().map(|m| {
        let ident = &m.ident;
        let wire = &m.wire;
        let docs = &m.docs;
        let names: Vec<_> = m.args.iter().map(|(n, _)| n).collect();
        let types: Vec<_> = m.args.iter().map(|(_, t)| t).collect();
        match m.kind {
            Kind::Method | Kind::Event if m.raw => {
                let (ok, call) = match m.kind {
                    Kind::Method => {
                        let ok = &m.ok;
                        (quote!(#ok), quote!(call_typed))
                    }
                    _ => (quote!(()), quote!(emit_typed)),
                };
                quote! {
                    #(#docs)*
                    pub async fn #ident(&self, #(#names: #types),*)
                        -> ::core::result::Result<#ok, #krate::TypedError>
                    {
                        #krate::TypedConnection::#call(&self.conn, #iface, #wire, #(#names)*).await
                    }
                }
            }
            Kind::Method => {
                let ok = &m.ok;
                quote! {
                    #(#docs)*
                    pub async fn #ident(&self, #(#names: #types),*)
                        -> ::core::result::Result<#ok, #krate::TypedError>
                    {
                        #krate::TypedConnection::call_typed(
                            &self.conn, #iface, #wire, (#(#names,)*)
                        ).await
                    }
                }
            }
            Kind::Event => {
                let doc = format!("Sends the event `{iface}.{wire}`.");
                quote! {
                    #(#docs)*
                    #[doc = ""]
                    #[doc = #doc]
                    pub async fn #ident(&self, #(#names: #types),*)
                        -> ::core::result::Result<(), #krate::TypedError>
                    {
                        #krate::TypedConnection::emit_typed(
                            &self.conn, #iface, #wire, (#(#names,)*)
                        ).await
                    }
                }
            }
            Kind::Emit => {
                let on = format_ident!("on_{}", ident);
                let doc = format!(
                    "The `{iface}.{wire}` events the server sends from now on, typed; \
                     subscribe before causing them."
                );
                quote! {
                    #(#docs)*
                    #[doc = ""]
                    #[doc = #doc]
                    pub fn #on(&self) -> #krate::typed::EventStream<(#(#types,)*)> {
                        #krate::typed::EventStream::new(&self.conn, #iface, #wire)
                    }
                }
            }
        }
    });

    let emits: Vec<_> = items.iter().filter(|m| m.kind == Kind::Emit).collect();
    let events = if emits.is_empty() {
        quote!()
    } else {
        let events_ident = format_ident!("{}Events", trait_ident);
        let events_doc = format!(
            "The events the `{iface}` interface's server sends (see [`{trait_ident}`]), typed."
        );
        let fns = emits.iter().map(|m| {
            let ident = &m.ident;
            let wire = &m.wire;
            let docs = &m.docs;
            let names: Vec<_> = m.args.iter().map(|(n, _)| n).collect();
            let types: Vec<_> = m.args.iter().map(|(_, t)| t).collect();
            let args_fn = format_ident!("{}_args", ident);
            let emit_fn = format_ident!("emit_{}", ident);
            let broadcast_fn = format_ident!("broadcast_{}", ident);
            let args_doc = format!("The arguments of `{iface}.{wire}` as JSTP values.");
            let emit_doc =
                format!("Sends `{iface}.{wire}` to one peer, waiting under backpressure.");
            let broadcast_doc = format!(
                "Sends `{iface}.{wire}` to every client of `server`; returns how many it was \
                 queued for."
            );
            quote! {
                #(#docs)*
                #[doc = ""]
                #[doc = #args_doc]
                pub fn #args_fn(#(#names: #types),*)
                    -> ::core::result::Result<::std::vec::Vec<#krate::Value>, #krate::TypedError>
                {
                    #krate::typed::event_args(&(#(#names,)*))
                }

                #[doc = #emit_doc]
                pub async fn #emit_fn(conn: &#krate::Connection, #(#names: #types),*)
                    -> ::core::result::Result<(), #krate::TypedError>
                {
                    #krate::TypedConnection::emit_typed(conn, #iface, #wire, (#(#names,)*)).await
                }

                #[doc = #broadcast_doc]
                pub fn #broadcast_fn(server: &#krate::Server, #(#names: #types),*)
                    -> ::core::result::Result<usize, #krate::TypedError>
                {
                    #krate::TypedBroadcast::broadcast_typed(server, #iface, #wire, (#(#names,)*))
                }
            }
        });
        quote! {
            #[doc = #events_doc]
            #[derive(Debug, Clone, Copy)]
            #vis struct #events_ident;

            impl #events_ident {
                #(#fns)*
            }
        }
    };

    Ok(quote! {
        #item_trait

        #[doc = #client_doc]
        #[derive(Debug, Clone)]
        #vis struct #client {
            conn: #krate::Connection,
        }

        impl #client {
            /// Calls the interface over `conn`.
            pub fn new(conn: #krate::Connection) -> Self {
                Self { conn }
            }

            /// The connection behind the client.
            pub fn connection(&self) -> &#krate::Connection {
                &self.conn
            }

            #(#calls)*
        }

        #events
    })
}
