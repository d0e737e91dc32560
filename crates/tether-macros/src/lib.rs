//! One definition, both sides: `#[interface]` on a trait of `async fn`s gives the server a
//! [`tether::Interface`](../tether/struct.Interface.html) built from any implementation and the
//! caller a typed client, with the names the wire uses.
//!
//! ```
//! use tether::{Application, RemoteError};
//!
//! #[tether_macros::interface(name = "calculator")]
//! pub trait Calculator {
//!     async fn divide(&self, a: f64, b: f64) -> Result<f64, RemoteError>;
//!     #[tether(rename = "doNothing")]
//!     async fn do_nothing(&self) -> Result<(), RemoteError>;
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
//! // Client side: `CalculatorClient::new(conn).divide(20.0, 10.0).await?` is an `f64`.
//! # let _ = CalculatorClient::new;
//! ```
//!
//! What it generates, for a trait `Calculator`:
//! - the trait itself, each `async fn` rewritten to return `impl Future + Send` (so servers can
//!   run it on any task; an implementation still writes `async fn`), plus
//!   `const INTERFACE_NAME` and `fn into_interface(self) -> tether::Interface`, which
//!   registers every method with `tether::Interface::typed_method` (arity and argument types are
//!   checked there: a mismatch answers JSTP's `[17]`);
//! - `CalculatorClient`, wrapping a `tether::Connection`, with one `async fn` per method
//!   returning `Result<T, tether::TypedError>`.
//!
//! The interface name defaults to the trait's name with its first letter lowercased
//! (`SomeService` → `someService`); a method's wire name is its own unless
//! `#[tether(rename = "…")]` says otherwise.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;
use quote::{format_ident, quote};
use syn::spanned::Spanned;
use syn::{
    parse_macro_input, parse_quote, Attribute, FnArg, GenericArgument, Ident, ItemTrait, LitStr,
    Pat, PathArguments, ReturnType, TraitItem, Type,
};

/// Turns a trait of `async fn(&self, …) -> Result<T, RemoteError>` methods into a tether
/// interface and a typed client. See the crate documentation.
#[proc_macro_attribute]
pub fn interface(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut name: Option<LitStr> = None;
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("name") {
            name = Some(meta.value()?.parse()?);
            Ok(())
        } else {
            Err(meta.error("expected `name = \"…\"`"))
        }
    });
    parse_macro_input!(attr with parser);
    let mut item = parse_macro_input!(item as ItemTrait);
    match expand(&mut item, name) {
        Ok(out) => out.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

struct Method {
    ident: Ident,
    wire: String,
    args: Vec<(Ident, Type)>,
    ok: Type,
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

fn method(f: &mut syn::TraitItemFn) -> syn::Result<Method> {
    let mut wire = f.sig.ident.to_string();
    let mut attr_error = None;
    f.attrs.retain(|a| {
        if !a.path().is_ident("tether") {
            return true;
        }
        let parsed = a.parse_nested_meta(|meta| {
            if meta.path.is_ident("rename") {
                let name: LitStr = meta.value()?.parse()?;
                wire = name.value();
                Ok(())
            } else {
                Err(meta.error("expected `rename = \"…\"`"))
            }
        });
        if let Err(e) = parsed {
            attr_error = Some(e);
        }
        false
    });
    if let Some(e) = attr_error {
        return Err(e);
    }
    let sig = &f.sig;
    if sig.asyncness.is_none() {
        return Err(syn::Error::new(
            sig.fn_token.span(),
            "an #[interface] method must be an `async fn`",
        ));
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
    let mut inputs = sig.inputs.iter();
    match inputs.next() {
        Some(FnArg::Receiver(r)) if r.reference.is_some() && r.mutability.is_none() => {}
        _ => {
            return Err(syn::Error::new(
                sig.ident.span(),
                "an #[interface] method takes `&self` first",
            ))
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
    let ok = ok_type(&sig.output)?;
    let docs = f
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .cloned()
        .collect();
    Ok(Method {
        ident: sig.ident.clone(),
        wire,
        args,
        ok,
        docs,
    })
}

fn expand(item: &mut ItemTrait, name: Option<LitStr>) -> syn::Result<TokenStream2> {
    let iface = name.map_or_else(|| lower_first(&item.ident.to_string()), |n| n.value());
    let mut methods = Vec::new();
    for entry in &mut item.items {
        let TraitItem::Fn(f) = entry else {
            return Err(syn::Error::new(
                entry.span(),
                "an #[interface] trait holds only methods",
            ));
        };
        methods.push(method(f)?);
        // A server runs methods on any task, so their futures must be `Send`.
        let ReturnType::Type(_, output) = &f.sig.output else {
            unreachable!("checked by ok_type")
        };
        let output = output.clone();
        f.sig.asyncness = None;
        f.sig.output =
            parse_quote!(-> impl ::core::future::Future<Output = #output> + ::core::marker::Send);
    }

    let registrations = methods.iter().map(|m| {
        let ident = &m.ident;
        let wire = &m.wire;
        let names: Vec<_> = m.args.iter().map(|(n, _)| n).collect();
        let types: Vec<_> = m.args.iter().map(|(_, t)| t).collect();
        quote! {
            .typed_method(#wire, {
                let this = ::std::sync::Arc::clone(&this);
                move |_conn: ::tether::Connection, (#(#names,)*): (#(#types,)*)| {
                    let this = ::std::sync::Arc::clone(&this);
                    async move { this.#ident(#(#names),*).await }
                }
            })
        }
    });
    item.items.push(parse_quote! {
        /// The interface's name on the wire.
        const INTERFACE_NAME: &'static str = #iface;
    });
    item.items.push(parse_quote! {
        /// This implementation as a tether interface: every method registered under its wire
        /// name with typed arguments and result.
        fn into_interface(self) -> ::tether::Interface
        where
            Self: ::core::marker::Sized + ::core::marker::Send + ::core::marker::Sync + 'static,
        {
            let this = ::std::sync::Arc::new(self);
            ::tether::Interface::new() #(#registrations)*
        }
    });

    let vis = &item.vis;
    let client = format_ident!("{}Client", item.ident);
    let client_doc = format!(
        "A typed client of the `{iface}` interface (see [`{}`]).",
        item.ident
    );
    let calls = methods.iter().map(|m| {
        let ident = &m.ident;
        let wire = &m.wire;
        let ok = &m.ok;
        let docs = &m.docs;
        let names: Vec<_> = m.args.iter().map(|(n, _)| n).collect();
        let types: Vec<_> = m.args.iter().map(|(_, t)| t).collect();
        quote! {
            #(#docs)*
            pub async fn #ident(&self, #(#names: #types),*)
                -> ::core::result::Result<#ok, ::tether::TypedError>
            {
                ::tether::TypedConnection::call_typed(&self.conn, #iface, #wire, (#(#names,)*)).await
            }
        }
    });
    Ok(quote! {
        #item

        #[doc = #client_doc]
        #[derive(Debug, Clone)]
        #vis struct #client {
            conn: ::tether::Connection,
        }

        impl #client {
            /// Calls the interface over `conn`.
            pub fn new(conn: ::tether::Connection) -> Self {
                Self { conn }
            }

            /// The connection behind the client.
            pub fn connection(&self) -> &::tether::Connection {
                &self.conn
            }

            #(#calls)*
        }
    })
}
