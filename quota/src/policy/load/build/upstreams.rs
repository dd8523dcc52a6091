//! Upstreams: address, timeouts, injected headers, TLS name, and the path prefixes put in front of
//! upstream paths (`base_path`, and a route's `rewrite`).

use super::Builder;
use crate::policy::dto::UpstreamDto;
use crate::policy::load::sources::{EnvError, expand_env};
use crate::policy::{EnvMode, Upstream};
use serde_saphyr::Spanned;
use std::sync::Arc;
use std::time::Duration;

impl<'a> Builder<'a> {
    pub(super) fn upstream(&mut self, file: &str, name: &str, up: &Spanned<UpstreamDto>) {
        let path = format!("upstreams.{name}");
        if self.upstreams.contains_key(name) {
            self.err(
                file,
                up.referenced,
                &path,
                format!("upstream `{name}` is defined twice"),
            );
            return;
        }
        let dto = &up.value;
        let addr = dto.address.value.trim();
        let host = match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
                host
            }
            _ => {
                self.err(
                    file,
                    dto.address.referenced,
                    format!("{path}.address"),
                    format!("expected `host:port` with a port from 1 to 65535, got `{addr}`"),
                );
                self.broken_upstreams.insert(name.to_string());
                return;
            }
        };
        for (field, v) in [
            ("connect_timeout_ms", dto.connect_timeout_ms),
            ("read_timeout_ms", dto.read_timeout_ms),
            ("write_timeout_ms", dto.write_timeout_ms),
            ("idle_timeout_ms", dto.idle_timeout_ms),
        ] {
            if v == 0 {
                self.err(
                    file,
                    up.referenced,
                    format!("{path}.{field}"),
                    "expected a timeout of at least 1 ms",
                );
            }
        }
        let mut headers = Vec::with_capacity(dto.headers.len());
        let mut unresolved = None;
        for (name, value) in &dto.headers {
            let hpath = format!("{path}.headers.{name}");
            let Ok(hname) = http::HeaderName::from_bytes(name.as_bytes()) else {
                self.err(
                    file,
                    value.referenced,
                    &hpath,
                    format!("`{name}` is not a valid header name"),
                );
                continue;
            };
            match expand_env(&value.value) {
                Err(EnvError::Reserved(var)) => {
                    let msg = format!(
                        "`{var}`: TOLLGATE_* variables are the gateway's own settings and \
                         secrets and are never sent upstream; use another name"
                    );
                    self.err(file, value.referenced, &hpath, msg);
                }
                Err(EnvError::Missing(var)) if self.env == EnvMode::Lenient => {
                    unresolved.get_or_insert(var);
                }
                Err(EnvError::Missing(var)) => {
                    let msg = format!("environment variable `{var}` is not set");
                    self.err(file, value.referenced, &hpath, msg);
                }
                Ok(v) => match http::HeaderValue::from_str(&v) {
                    Ok(mut hv) => {
                        hv.set_sensitive(true);
                        headers.push((hname, hv));
                    }
                    Err(_) => self.err(file, value.referenced, &hpath, "not a valid header value"),
                },
            }
        }
        let base_path = match &dto.base_path {
            Some(b) => self.prefix_path(file, b, format!("{path}.base_path")),
            None => String::new(),
        };
        let sni = dto.sni.clone().unwrap_or_else(|| {
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        });
        let Ok(host) = http::HeaderValue::from_str(&sni) else {
            let msg = format!("`{sni}` is not a valid host name");
            self.err(file, up.referenced, format!("{path}.sni"), msg);
            self.broken_upstreams.insert(name.to_string());
            return;
        };
        self.upstreams.insert(
            name.to_string(),
            Arc::new(Upstream {
                name: name.into(),
                address: addr.to_string(),
                literal: addr.parse().ok(),
                tls: dto.tls,
                sni,
                host,
                connect_timeout: Duration::from_millis(dto.connect_timeout_ms),
                read_timeout: Duration::from_millis(dto.read_timeout_ms),
                write_timeout: Duration::from_millis(dto.write_timeout_ms),
                idle_timeout: Duration::from_millis(dto.idle_timeout_ms),
                tls_verify: dto.tls_verify,
                ca_file: dto.ca_file.as_ref().map(|c| c.value.clone()),
                base_path,
                headers,
                unresolved,
            }),
        );
    }

    /// A path put in front of upstream paths (`base_path`, `rewrite`): empty, or normalized and
    /// without a trailing slash.
    pub(super) fn prefix_path(&mut self, file: &str, p: &Spanned<String>, field: String) -> String {
        let v = p.value.trim_end_matches('/');
        if v.is_empty() {
            return String::new();
        }
        match crate::http_path::normalize(v) {
            Ok(n) if n == v => v.to_string(),
            Ok(n) => {
                let msg = format!("`{}` is not in normal form; write `{n}`", p.value);
                self.err(file, p.referenced, field, msg);
                String::new()
            }
            Err(e) => {
                let msg = format!("`{}` is not a valid path prefix: {e}", p.value);
                self.err(file, p.referenced, field, msg);
                String::new()
            }
        }
    }
}
