//! Routes: match, upstream and quota references, path rewriting, and the LLM metering settings of
//! an LLM route (`llm:`).

use super::{Builder, list};
use crate::llm::{Provider, TokenKinds};
use crate::names::NameKind;
use crate::policy::dto::{
    LlmRouteDto, OverMaxDto, OverrunDto, ProviderDto, RouteDto, TokenKindDto,
};
use crate::policy::{LlmRoute, Route};
use serde_saphyr::Spanned;
use std::sync::Arc;
use std::time::Duration;

impl<'a> Builder<'a> {
    pub(super) fn route(
        &mut self,
        file: &str,
        i: usize,
        route: &Spanned<RouteDto>,
        quotas: &[String],
    ) -> Option<Route> {
        let r = &route.value;
        let path = format!("routes[{i}]");
        let before = self.errors.len();
        let upstream = self.upstreams.get(&r.upstream.value).cloned();
        if upstream.is_none() && !self.broken_upstreams.contains(&r.upstream.value) {
            let mut known: Vec<&str> = self.upstreams.keys().map(String::as_str).collect();
            known.sort();
            let msg = format!(
                "unknown upstream `{}`; defined upstreams: {}",
                r.upstream.value,
                list(&known)
            );
            self.err(file, r.upstream.referenced, format!("{path}.upstream"), msg);
        }
        if !quotas.contains(&r.quota.value) {
            let known: Vec<&str> = quotas.iter().map(String::as_str).collect();
            let msg = format!(
                "quota type `{}` is not defined by any tier; defined quota types: {}",
                r.quota.value,
                list(&known)
            );
            self.err(file, r.quota.referenced, format!("{path}.quota"), msg);
        }
        self.name(
            file,
            route.referenced,
            format!("{path}.name"),
            NameKind::Route,
            &r.name,
        );
        let prefix = &r.matcher.path_prefix;
        // Requests are matched by their normalized path: a prefix in another form never matches.
        match crate::http_path::normalize(&prefix.value) {
            Ok(n) if n == prefix.value.as_str() => {}
            Ok(n) => {
                let msg = format!(
                    "`{}` is not in normal form (requests are matched after normalization); write `{n}`",
                    prefix.value
                );
                self.err(
                    file,
                    prefix.referenced,
                    format!("{path}.match.path_prefix"),
                    msg,
                );
            }
            Err(e) => {
                let msg = match e {
                    crate::http_path::PathError::NotAbsolute => {
                        format!("expected a path starting with `/`, got `{}`", prefix.value)
                    }
                    e => format!("`{}` is not a valid path: {e}", prefix.value),
                };
                self.err(
                    file,
                    prefix.referenced,
                    format!("{path}.match.path_prefix"),
                    msg,
                );
            }
        }
        let upstream_prefix = match (&r.rewrite, r.strip_prefix) {
            (Some(new), true) => {
                self.err(
                    file,
                    new.referenced,
                    format!("{path}.rewrite"),
                    "`rewrite` and `strip_prefix` exclude each other (`strip_prefix` is `rewrite: \"\"`)",
                );
                None
            }
            (Some(new), false) => Some(self.prefix_path(file, new, format!("{path}.rewrite"))),
            (None, true) => Some(String::new()),
            (None, false) => None,
        };
        let llm = r.llm.as_ref().map(|l| {
            self.llm_route_distinct(file, &path, &r.quota, &l.value);
            self.llm_route(file, &path, &l.value, quotas)
        });
        let fallback_upstream = r.fallback_upstream.as_ref().and_then(|f| {
            let up = self.upstreams.get(&f.value).cloned();
            if up.is_none() {
                let msg = format!("unknown upstream `{}`", f.value);
                self.err(file, f.referenced, format!("{path}.fallback_upstream"), msg);
            }
            up
        });
        let method = r.matcher.method.as_ref().map(|m| {
            if m.value.is_empty() || !m.value.bytes().all(|b| b.is_ascii_alphabetic()) {
                self.err(
                    file,
                    m.referenced,
                    format!("{path}.match.method"),
                    format!(
                        "expected an HTTP method such as GET or POST, got `{}`",
                        m.value
                    ),
                );
            }
            m.value.to_ascii_uppercase()
        });
        if self.errors.len() != before {
            return None;
        }
        Some(Route {
            name: r.name.as_str().into(),
            method,
            host: r
                .matcher
                .host
                .as_ref()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase()),
            path_prefix: prefix.value.clone(),
            upstream: upstream?,
            quota: r.quota.value.as_str().into(),
            cost: r.cost,
            expensive: r.expensive,
            fallback_upstream,
            llm: llm.flatten().map(Arc::new),
            upstream_prefix,
        })
    }

    fn llm_route_distinct(
        &mut self,
        file: &str,
        path: &str,
        route_quota: &Spanned<String>,
        l: &LlmRouteDto,
    ) {
        let spend = l.spend.as_ref().map(|s| s.value.as_str());
        let clash =
            if l.tokens.value == route_quota.value || spend == Some(route_quota.value.as_str()) {
                Some("the route's `quota` must differ from `llm.tokens` and `llm.spend`")
            } else if spend == Some(l.tokens.value.as_str()) {
                Some("`llm.tokens` and `llm.spend` must be different quota types")
            } else {
                None
            };
        if let Some(msg) = clash {
            self.err(file, l.tokens.referenced, format!("{path}.llm.tokens"), msg);
        }
    }

    fn llm_route(
        &mut self,
        file: &str,
        path: &str,
        l: &LlmRouteDto,
        quotas: &[String],
    ) -> Option<LlmRoute> {
        let before = self.errors.len();
        for (field, q) in [("tokens", Some(&l.tokens)), ("spend", l.spend.as_ref())] {
            if let Some(q) = q
                && !quotas.contains(&q.value)
            {
                let known: Vec<&str> = quotas.iter().map(String::as_str).collect();
                let msg = format!(
                    "quota type `{}` is not defined by any tier; defined quota types: {}",
                    q.value,
                    list(&known)
                );
                self.err(file, q.referenced, format!("{path}.llm.{field}"), msg);
            }
        }
        if let Some(spend) = &l.spend
            && self.models.is_empty()
        {
            self.err(
                file,
                spend.referenced,
                format!("{path}.llm.spend"),
                "spend is priced by `models`, which has no entry",
            );
        }
        for (field, v) in [
            ("default_max_tokens", l.default_max_tokens),
            ("max_body_bytes", l.max_body_bytes),
            ("reservation_ttl_ms", l.reservation_ttl_ms),
        ] {
            if v == 0 {
                self.err(
                    file,
                    l.tokens.referenced,
                    format!("{path}.llm.{field}"),
                    "expected a value of at least 1",
                );
            }
        }
        if let Some(kinds) = &l.tokens_count
            && kinds.value.is_empty()
        {
            self.err(
                file,
                kinds.referenced,
                format!("{path}.llm.tokens_count"),
                "expected at least one token kind (input, cached_input, cache_write, cache_read, output)",
            );
        }
        if l.max_output_tokens == Some(0) {
            self.err(
                file,
                l.tokens.referenced,
                format!("{path}.llm.max_output_tokens"),
                "expected a value of at least 1",
            );
        }
        for (i, p) in l.unmetered_paths.iter().enumerate() {
            if !matches!(crate::http_path::normalize(&p.value), Ok(n) if n == p.value.as_str()) {
                let msg = format!(
                    "expected a normalized path starting with `/`, got `{}`",
                    p.value
                );
                self.err(
                    file,
                    p.referenced,
                    format!("{path}.llm.unmetered_paths[{i}]"),
                    msg,
                );
            }
        }
        (self.errors.len() == before).then(|| LlmRoute {
            provider: match l.provider {
                ProviderDto::Openai => Provider::OpenAi,
                ProviderDto::Anthropic => Provider::Anthropic,
            },
            tokens_quota: l.tokens.value.as_str().into(),
            tokens_count: match &l.tokens_count {
                None => TokenKinds::ALL,
                Some(kinds) => kinds.value.iter().fold(TokenKinds::NONE, |k, d| {
                    k.with(match d {
                        TokenKindDto::Input => TokenKinds::INPUT,
                        TokenKindDto::CachedInput => TokenKinds::CACHED_INPUT,
                        TokenKindDto::CacheWrite => TokenKinds::CACHE_WRITE,
                        TokenKindDto::CacheRead => TokenKinds::CACHE_READ,
                        TokenKindDto::Output => TokenKinds::OUTPUT,
                    })
                }),
            },
            spend_quota: l.spend.as_ref().map(|s| s.value.as_str().into()),
            default_max_tokens: l.default_max_tokens,
            max_body_bytes: l.max_body_bytes,
            drain: Duration::from_millis(l.drain_ms),
            drain_bytes: l.drain_bytes,
            reservation_ttl: Duration::from_millis(l.reservation_ttl_ms),
            max_output_tokens: l.max_output_tokens,
            clamp_max_output: l.over_max_output == OverMaxDto::Clamp,
            cut_overrun: l.on_overrun == OverrunDto::Cut,
            image_tokens: l.image_tokens,
            unmetered_paths: l.unmetered_paths.iter().map(|p| p.value.clone()).collect(),
        })
    }
}
