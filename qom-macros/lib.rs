//! `#[derive(Object)]`: turns a Rust struct into a QOM type's instance state.
//!
//! ```ignore
//! #[derive(Object)]
//! #[qom(name = "isa-debug-exit")]
//! pub struct DebugExit {
//!     #[parent]
//!     parent: IsaDevice,
//!     #[property(default = 0x501, desc = "First I/O port")]
//!     iobase: Prop<u16>,
//! }
//! ```
//!
//! generates `qom::ObjectType` (type name, parent, the property table bound to the
//! `#[property]` fields, projection to ancestors for dynamic casts), `Deref` to the parent
//! (QEMU's `ParentField`: a typed upcast that cannot fail) and `Default` with the property
//! defaults. Registration stays explicit: `qom::type_init!(DebugExit)`.
//!
//! Struct attributes: `#[qom(name = EXPR)]` (required), `abstract`, `interfaces = [...]`
//! (QOM interface names), `implements = [dyn Trait, ...]` (interface traits the struct
//! implements, see `qom::Interface`; their QOM names are added to the interfaces),
//! `no_default` (write `Default` by hand), `class_level` (the type implements
//! `qom::ClassInitFor<T>` for its subtypes itself, because it adds or changes a class level;
//! otherwise subtypes' classes are built as the parent builds them).

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::quote;
use syn::punctuated::Punctuated;
use syn::{
    parse_macro_input, Data, DeriveInput, Expr, ExprArray, ExprLit, Fields, GenericArgument, Ident,
    Lit, LitStr, Meta, PathArguments, Token, Type,
};

/// Derives a QOM type from a struct; see the crate documentation.
#[proc_macro_derive(Object, attributes(qom, parent, property))]
pub fn derive_object(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

struct TypeAttrs {
    name: Expr,
    abstract_: bool,
    interfaces: Option<ExprArray>,
    implements: Vec<Type>,
    default: bool,
    class_level: bool,
}

fn type_attrs(input: &DeriveInput) -> syn::Result<TypeAttrs> {
    let mut attrs = TypeAttrs {
        name: syn::parse_quote!(""),
        abstract_: false,
        interfaces: None,
        implements: Vec::new(),
        default: true,
        class_level: false,
    };
    let mut named = false;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("qom")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                attrs.name = meta.value()?.parse()?;
                named = true;
            } else if meta.path.is_ident("abstract") {
                attrs.abstract_ = true;
            } else if meta.path.is_ident("interfaces") {
                attrs.interfaces = Some(meta.value()?.parse()?);
            } else if meta.path.is_ident("implements") {
                let value = meta.value()?;
                let content;
                syn::bracketed!(content in value);
                let list = Punctuated::<Type, Token![,]>::parse_terminated(&content)?;
                attrs.implements.extend(list);
            } else if meta.path.is_ident("no_default") {
                attrs.default = false;
            } else if meta.path.is_ident("class_level") {
                attrs.class_level = true;
            } else {
                return Err(meta.error(
                    "expected `name`, `abstract`, `interfaces`, `implements`, `no_default` or `class_level`",
                ));
            }
            Ok(())
        })?;
    }
    if !named {
        return Err(syn::Error::new(
            Span::call_site(),
            "a QOM type needs #[qom(name = \"...\")]",
        ));
    }
    Ok(attrs)
}

struct PropertyAttrs {
    name: LitStr,
    default: Option<Expr>,
    desc: LitStr,
}

fn property_attrs(field: &syn::Field, ident: &Ident) -> syn::Result<Option<PropertyAttrs>> {
    let Some(attr) = field.attrs.iter().find(|a| a.path().is_ident("property")) else {
        return Ok(None);
    };
    let mut attrs = PropertyAttrs {
        name: LitStr::new(&ident.to_string(), ident.span()),
        default: None,
        desc: LitStr::new("", ident.span()),
    };
    if let Meta::List(_) = &attr.meta {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                attrs.name = meta.value()?.parse()?;
            } else if meta.path.is_ident("default") {
                attrs.default = Some(meta.value()?.parse()?);
            } else if meta.path.is_ident("desc") {
                attrs.desc = meta.value()?.parse()?;
            } else {
                return Err(meta.error("expected `name`, `default` or `desc`"));
            }
            Ok(())
        })?;
    }
    Ok(Some(attrs))
}

/// `T` of a field typed `Prop<T>`.
fn prop_inner(ty: &Type) -> syn::Result<&Type> {
    if let Type::Path(path) = ty {
        if let Some(last) = path.path.segments.last() {
            if last.ident == "Prop" {
                if let PathArguments::AngleBracketed(args) = &last.arguments {
                    if let Some(GenericArgument::Type(inner)) = args.args.first() {
                        return Ok(inner);
                    }
                }
            }
        }
    }
    Err(syn::Error::new_spanned(
        ty,
        "a #[property] field must be of type qom::Prop<T>",
    ))
}

fn expand(input: &DeriveInput) -> syn::Result<TokenStream2> {
    let ty = &input.ident;
    if !input.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &input.generics,
            "QOM types cannot be generic",
        ));
    }
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new_spanned(ty, "QOM types are structs"));
    };
    let Fields::Named(fields) = &data.fields else {
        return Err(syn::Error::new_spanned(ty, "QOM types have named fields"));
    };
    let attrs = type_attrs(input)?;

    let mut parent: Option<(&Ident, &Type)> = None;
    let mut properties = Vec::new();
    let mut defaults = Vec::new();
    for field in &fields.named {
        let ident = field.ident.as_ref().expect("named field");
        if field.attrs.iter().any(|a| a.path().is_ident("parent")) {
            if parent.is_some() {
                return Err(syn::Error::new_spanned(field, "only one #[parent] field"));
            }
            parent = Some((ident, &field.ty));
            defaults.push(quote!(#ident: ::core::default::Default::default()));
            continue;
        }
        let Some(prop) = property_attrs(field, ident)? else {
            defaults.push(quote!(#ident: ::core::default::Default::default()));
            continue;
        };
        let inner = prop_inner(&field.ty)?;
        let PropertyAttrs {
            name,
            default,
            desc,
        } = prop;
        let default_value = match &default {
            // A string literal default goes through `DefaultFrom`, so that `String`,
            // `Option<String>` and enums take it by name.
            Some(Expr::Lit(ExprLit {
                lit: Lit::Str(s), ..
            })) => quote!(<#inner as ::qom::DefaultFrom<&str>>::default_from(#s)),
            Some(expr) => quote!({ let value: #inner = #expr; value }),
            None => quote!(<#inner as ::core::default::Default>::default()),
        };
        defaults.push(quote!(#ident: ::qom::Prop::new(#default_value)));
        properties.push(quote! {{
            fn get(obj: &::qom::Object, prop: &::qom::Property) -> ::core::result::Result<::qom::Value, ::qom::Error> {
                ::qom::typed::field_get(obj, prop, |state: &#ty| &state.#ident)
            }
            fn set(obj: &::qom::Object, prop: &::qom::Property, value: ::qom::Value) -> ::core::result::Result<(), ::qom::Error> {
                ::qom::typed::field_set(obj, prop, value, |state: &#ty| &state.#ident)
            }
            fn default() -> ::core::option::Option<::qom::Value> {
                let value: #inner = #default_value;
                ::qom::PropertyType::default_value(&value)
            }
            ::qom::Property::field(#name, <#inner as ::qom::PropertyType>::KIND, #desc, get, set, default)
        }});
    }
    let Some((parent_ident, parent_ty)) = parent else {
        return Err(syn::Error::new_spanned(
            ty,
            "a QOM type needs a #[parent] field holding its parent type's state",
        ));
    };

    let name = &attrs.name;
    let abstract_ = attrs.abstract_;
    let mut interface_names: Vec<TokenStream2> = attrs
        .interfaces
        .iter()
        .flat_map(|list| list.elems.iter().map(|e| quote!(#e)))
        .collect();
    let mut interface_impls = Vec::new();
    for iface in &attrs.implements {
        interface_names.push(quote!(<#iface as ::qom::Interface>::TYPE_NAME));
        interface_impls.push(quote! {{
            fn install(class: &mut ::qom::ObjectClass) {
                fn cast(obj: &::qom::Object) -> ::core::option::Option<&(#iface + 'static)> {
                    obj.downcast::<#ty>().map(|state| state as &(#iface + 'static))
                }
                class.add_interface_impl::<#iface>(cast);
            }
            install
        }});
    }
    let interfaces = quote!(&[#(#interface_names),*]);
    let default_impl = attrs.default.then(|| {
        quote! {
            impl ::core::default::Default for #ty {
                fn default() -> Self {
                    #ty { #(#defaults,)* }
                }
            }
        }
    });
    // A type that adds no class level builds its subtypes' classes as its parent does.
    let class_init = (!attrs.class_level).then(|| {
        quote! {
            impl<T: ::qom::ObjectType> ::qom::ClassInitFor<T> for #ty
            where
                #parent_ty: ::qom::ClassInitFor<T>,
            {
                fn class_init(class: &mut ::qom::ObjectClass) {
                    <#parent_ty as ::qom::ClassInitFor<T>>::class_init(class)
                }
            }
        }
    });
    Ok(quote! {
        #class_init

        impl ::qom::ObjectType for #ty {
            const TYPE_NAME: &'static str = #name;
            type Parent = #parent_ty;
            const ABSTRACT: bool = #abstract_;
            const INTERFACES: &'static [&'static str] = #interfaces;
            const PROPERTIES: &'static [::qom::Property] = &[#(#properties),*];
            const INTERFACE_IMPLS: &'static [fn(&mut ::qom::ObjectClass)] = &[#(#interface_impls),*];
            #[inline]
            fn parent_state(&self) -> &#parent_ty {
                &self.#parent_ident
            }
            #[inline]
            fn object_base_mut(&mut self) -> &mut ::qom::ObjectBase {
                ::qom::ObjectType::object_base_mut(&mut self.#parent_ident)
            }
            fn for_each_level<'a>(
                &'a self,
                f: &mut dyn FnMut(::core::any::TypeId, &'a (dyn ::core::any::Any + Send + Sync)),
            ) {
                ::qom::ObjectType::for_each_level(&self.#parent_ident, f);
                f(::core::any::TypeId::of::<#ty>(), self);
            }
            #[inline]
            fn project(&self, id: ::core::any::TypeId) -> ::core::option::Option<&(dyn ::core::any::Any + Send + Sync)> {
                // Root first: most casts are to a base state (DeviceState, BusState...).
                match ::qom::ObjectType::project(&self.#parent_ident, id) {
                    ::core::option::Option::None if id == ::core::any::TypeId::of::<#ty>() => {
                        ::core::option::Option::Some(self)
                    }
                    found => found,
                }
            }
        }

        impl ::qom::IsA<#parent_ty> for #ty {
            #[inline]
            fn upcast(&self) -> &#parent_ty {
                &self.#parent_ident
            }
        }

        impl ::core::ops::Deref for #ty {
            type Target = #parent_ty;
            #[inline]
            fn deref(&self) -> &#parent_ty {
                &self.#parent_ident
            }
        }

        #default_impl
    })
}
