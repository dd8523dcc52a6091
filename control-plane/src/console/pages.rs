//! The console's pages as maud templates. Forms post to the console's routes with the session's
//! CSRF token; edit controls appear only for roles that may use them.

use super::chart::{bar, fmt, line_chart};
use super::session::Signed;
use super::{Checked, LimitUse, can_edit, path_part};
use crate::gateways::GatewayConn;
use crate::store::{Change, PolicyVersion, SubjectRecord};
use crate::usage::{Chart, Overview, Range, Refusal, Top};
use crate::write::NewKey;
use axum::http::StatusCode;
use maud::{DOCTYPE, Markup, html};

const NAV: [(&str, &str); 5] = [
    ("overview", "Overview"),
    ("subjects", "Subjects"),
    ("policies", "Policies"),
    ("gateways", "Gateways"),
    ("changes", "Changes"),
];

fn layout(title: &str, who: Option<&Signed>, active: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Tollgate console" }
                link rel="stylesheet" href="/console/assets/console.css";
            }
            body {
                header.top {
                    span.brand { "Tollgate" }
                    @if let Some(w) = who {
                        nav {
                            @for (slug, name) in NAV {
                                a href=(format!("/console/{slug}")) class=(if slug == active { "on" } else { "" }) { (name) }
                            }
                        }
                        span.who {
                            span #who { (w.actor.name) } " · " span #role { (w.actor.role.name()) }
                        }
                        form.inline method="post" action="/console/logout" {
                            (csrf(w))
                            button #sign-out type="submit" { "Sign out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

fn csrf(w: &Signed) -> Markup {
    html! { input type="hidden" name="csrf" value=(w.csrf); }
}

pub fn error(who: Option<&Signed>, status: StatusCode, message: &str) -> Markup {
    layout(
        status.canonical_reason().unwrap_or("Error"),
        who,
        "",
        html! {
            p.error #error { (status.as_u16()) ": " (message) }
            p { a href="/console/overview" { "Back to the console" } }
        },
    )
}

pub fn login(csrf: &str, message: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        "",
        html! {
            @if let Some(m) = message { p.error #error { (m) } }
            form.card method="post" action="/console/login" {
                input type="hidden" name="csrf" value=(csrf);
                label for="token" { "Control-plane token (viewer, editor or admin)" }
                input #token type="password" name="token" autocomplete="off" required;
                button #sign-in type="submit" { "Sign in" }
            }
        },
    )
}

fn range_links(range: Range) -> Markup {
    html! {
        p.ranges {
            "Range: "
            @for (r, name) in [(Range::Hour, "last hour"), (Range::Day, "last day"), (Range::Month, "last 30 days")] {
                @if r == range { strong { (name) } } @else {
                    a href=(format!("/console/overview?range={}", r.name())) { (name) }
                }
                " "
            }
        }
    }
}

fn top_table(id: &str, title: &str, unit: &str, rows: &[Top], money: bool) -> Markup {
    html! {
        section.top-table {
            h2 { (title) }
            table id=(id) {
                thead { tr { th { "Subject" } th { (unit) } } }
                tbody {
                    @for t in rows {
                        tr {
                            td { a href=(format!("/console/subjects/{}", path_part(&t.subject))) { (t.subject) } }
                            td.num { @if money { "$" (format!("{:.6}", t.value)) } @else { (fmt(t.value)) } }
                        }
                    }
                    @if rows.is_empty() { tr { td colspan="2" { "nothing today" } } }
                }
            }
        }
    }
}

/// The overview's charts and today's top subjects (by spend, by refusals).
pub type OverviewData = (Overview, (Vec<Top>, Vec<Top>));

pub fn overview(who: &Signed, range: Range, data: Option<&OverviewData>) -> Markup {
    layout(
        "Overview",
        Some(who),
        "overview",
        html! {
            (range_links(range))
            @match data {
                None => { p.note { "No ledger is configured: start `control-plane serve` with `--ledger` or `--ingest-audit-log`." } }
                Some((o, (spend, refused))) => {
                    div.charts {
                        (line_chart(&o.requests))
                        (line_chart(&o.refusals))
                        (line_chart(&o.tokens))
                        (line_chart(&o.spend))
                    }
                    div.tops {
                        (top_table("top-spend", "Top subjects by spend today (UTC)", "spend", spend, true))
                        (top_table("top-refusals", "Top subjects by refusals today (UTC)", "refusals", refused, false))
                    }
                }
            }
        },
    )
}

fn mask(prefix: &str) -> String {
    format!("{prefix}…••••")
}

pub fn subjects(who: &Signed, q: &str, list: &[SubjectRecord]) -> Markup {
    layout(
        "Subjects",
        Some(who),
        "subjects",
        html! {
            form.search method="get" action="/console/subjects" {
                input #q type="search" name="q" value=(q) placeholder="subject or tier";
                button type="submit" { "Search" }
            }
            table #subjects {
                thead { tr { th { "Subject" } th { "Tier" } th { "Enabled" } th { "Time zone" } th { "Keys" } } }
                tbody {
                    @for s in list {
                        tr {
                            td { a href=(format!("/console/subjects/{}", path_part(&s.id))) { (s.id) } }
                            td.tier { (s.tier) }
                            td { @if s.enabled { "yes" } @else { "no" } }
                            td { (s.time_zone) }
                            td {
                                @for k in s.keys.iter().filter(|k| !k.revoked) {
                                    code.key { (mask(&k.prefix)) } " "
                                }
                            }
                        }
                    }
                    @if list.is_empty() { tr { td colspan="5" { "no subjects" } } }
                }
            }
        },
    )
}

pub fn subject(
    who: &Signed,
    s: &SubjectRecord,
    tiers: &[String],
    limits: &[LimitUse],
    history: Option<&(Vec<Chart>, Vec<Refusal>)>,
) -> Markup {
    let edit = can_edit(&who.actor);
    let base = format!("/console/subjects/{}", path_part(&s.id));
    layout(
        &format!("Subject {}", s.id),
        Some(who),
        "subjects",
        html! {
            dl.facts {
                dt { "Tier" } dd #tier { (s.tier) }
                dt { "Enabled" } dd { @if s.enabled { "yes" } @else { "no" } }
                dt { "Time zone" } dd { (s.time_zone) }
                dt { "Updated" } dd { (s.updated_at) " by " (s.updated_by) }
                @if !s.overrides.is_empty() {
                    dt { "Overrides" } dd { code { (serde_json::to_string(&s.overrides).unwrap_or_default()) } }
                }
            }
            @if edit {
                form.inline #tier-form method="post" action=(format!("{base}/tier")) {
                    (csrf(who))
                    label for="tier-select" { "Change tier " }
                    select #tier-select name="tier" {
                        @for t in tiers {
                            option value=(t) selected[*t == s.tier] { (t) }
                        }
                    }
                    button #change-tier type="submit" { "Change tier" }
                    span.hint { " (the same entitlement change as the payment webhook)" }
                }
            }
            h2 { "Keys" }
            table #keys {
                thead { tr { th { "Key" } th { "Id" } th { "Issued" } th { "State" } @if edit { th {} } } }
                tbody {
                    @for k in &s.keys {
                        tr {
                            td { code.key { (mask(&k.prefix)) } }
                            td { code { (k.id) } }
                            td { (k.created_at) " by " (k.created_by) }
                            td { @if k.revoked { "revoked" } @else { "active" } }
                            @if edit {
                                td {
                                    @if !k.revoked {
                                        form.inline method="post" action=(format!("{base}/keys/{}/revoke", path_part(&k.id))) {
                                            (csrf(who))
                                            button.danger type="submit" { "Revoke" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if edit {
                form.inline method="post" action=(format!("{base}/keys")) {
                    (csrf(who))
                    button #issue-key type="submit" { "Issue a key" }
                }
            }
            h2 { "Usage against limits" }
            table #limits {
                thead { tr { th { "Quota" } th { "Window" } th { "Used" } th {} th { "Limit" } th { "Resets (subject's time)" } } }
                tbody {
                    @for l in limits {
                        tr {
                            td { (l.quota) } td { (l.window) }
                            td.num { (l.used) }
                            td { (bar(l.used as f64, l.limit as f64)) }
                            td.num { (l.limit) }
                            td { (l.resets) }
                        }
                    }
                    @if limits.is_empty() { tr { td colspan="6" { "no daily or monthly limits in this tier" } } }
                }
            }
            @match history {
                None => { p.note { "No ledger is configured: usage history is not available." } }
                Some((charts, refusals)) => {
                    h2 { "Usage per quota type, last 30 days" }
                    div.charts {
                        @for c in charts { (line_chart(c)) }
                        @if charts.is_empty() { p.note { "no usage in the last 30 days" } }
                    }
                    h2 { "Recent refusals" }
                    table #refusals {
                        thead { tr { th { "When (UTC)" } th { "Quota" } th { "Reason" } th { "Request" } } }
                        tbody {
                            @for r in refusals {
                                tr { td { (r.at) } td { (r.quota) } td { (r.reason) } td { code { (r.request_id) } } }
                            }
                            @if refusals.is_empty() { tr { td colspan="4" { "none in the last 30 days" } } }
                        }
                    }
                }
            }
        },
    )
}

pub fn new_key(who: &Signed, k: &NewKey) -> Markup {
    layout(
        "New API key",
        Some(who),
        "subjects",
        html! {
            p { "The key of " strong { (k.subject) } " is shown this once; only its hash is stored." }
            p { code #new-key { (k.key) } }
            p { a href=(format!("/console/subjects/{}", path_part(&k.subject))) { "Back to " (k.subject) } }
        },
    )
}

pub fn policies(who: &Signed, history: &[PolicyVersion], published: Option<u64>) -> Markup {
    let edit = can_edit(&who.actor);
    let active = history.first().map(|p| p.version);
    layout(
        "Policies",
        Some(who),
        "policies",
        html! {
            @if let Some(v) = published { p.ok #published { "Version " (v) " is active." } }
            @if edit { p { a.button #edit-policy href="/console/policies/edit" { "Edit the active policy" } } }
            form.inline #diff-form method="get" action="/console/policies/diff" {
                "Diff from "
                select name="from" {
                    @for p in history { option value=(p.version) selected[Some(p.version) == active.map(|a| a.saturating_sub(1))] { "v" (p.version) } }
                }
                " to "
                select name="to" {
                    @for p in history { option value=(p.version) selected[Some(p.version) == active] { "v" (p.version) } }
                }
                " " button type="submit" { "Show diff" }
            }
            table #versions {
                thead { tr { th { "Version" } th { "Label" } th { "Author" } th { "Time" } th { "Comment" } th {} } }
                tbody {
                    @for p in history {
                        tr data-version=(p.version) {
                            td { "v" (p.version) @if Some(p.version) == active { " " span.badge { "active" } } }
                            td { (p.label) }
                            td { (p.actor) }
                            td { (p.created_at) }
                            td { (p.comment) }
                            td {
                                @if edit && Some(p.version) != active {
                                    form.inline method="post" action=(format!("/console/policies/{}/rollback", p.version)) {
                                        (csrf(who))
                                        button.rollback type="submit" { "Roll back to v" (p.version) }
                                    }
                                }
                            }
                        }
                    }
                    @if history.is_empty() { tr { td colspan="6" { "no policy uploaded yet" } } }
                }
            }
        },
    )
}

pub fn diff(who: &Signed, from: u64, to: u64, diff: &str) -> Markup {
    layout(
        &format!("Diff v{from} → v{to}"),
        Some(who),
        "policies",
        html! {
            @if diff.is_empty() { p.note { "The two versions are identical." } }
            pre.diff #diff {
                @for line in diff.lines() {
                    @let class = if line.starts_with("+++") || line.starts_with("---") { "hdr" }
                        else if line.starts_with('+') { "add" }
                        else if line.starts_with('-') { "del" }
                        else if line.starts_with("@@") { "hunk" } else { "" };
                    span class=(class) { (line) } "\n"
                }
            }
            p { a href="/console/policies" { "Back to the versions" } }
        },
    )
}

/// `(line, column)` of an error reported as `file:line:column: path: message`.
pub fn locate(error: &str) -> Option<(u32, u32)> {
    let parts: Vec<&str> = error.split(':').collect();
    parts.windows(2).find_map(|w| {
        let line = w[0].trim().parse::<u32>().ok()?;
        let column = w[1].trim().parse::<u32>().ok()?;
        Some((line, column))
    })
}

/// Errors shown on the editor page, and the widest column a caret is drawn under: a document
/// with tens of thousands of errors on one long line must not build a page of gigabytes.
const SHOWN_ERRORS: usize = 100;
const CARET_COLUMNS: u32 = 240;

pub fn editor(who: &Signed, yaml: &str, comment: &str, checked: &Checked) -> Markup {
    type Located<'a> = Vec<(Option<(u32, u32)>, &'a String)>;
    let (located, more): (Located, usize) = match checked {
        Checked::Invalid { errors, .. } => (
            errors
                .iter()
                .take(SHOWN_ERRORS)
                .map(|e| (locate(e), e))
                .collect(),
            errors.len().saturating_sub(SHOWN_ERRORS),
        ),
        _ => (Vec::new(), 0),
    };
    layout(
        "Edit policy",
        Some(who),
        "policies",
        html! {
            @match checked {
                Checked::None => {}
                Checked::Valid(v) => { p.ok #valid {
                    "Valid: label " (v["label"].as_str().unwrap_or("")) ", "
                    (v["routes"].as_array().map_or(0, Vec::len)) " routes, tiers "
                    (v["tiers"].as_array().map(|t| t.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", ")).unwrap_or_default())
                    ". Nothing was changed yet."
                } }
                Checked::Invalid { detail, .. } => { div.error #errors {
                    p { (detail) }
                    ul {
                        @for (at, e) in &located {
                            li.policy-error {
                                @if let Some((l, c)) = at { strong { "line " (l) ", column " (c) } ": " }
                                (e)
                            }
                        }
                        @if more > 0 {
                            li #more-errors { "… and " (more) " more (fix these first)" }
                        }
                    }
                } }
            }
            form.editor method="post" action="/console/policies/validate" {
                (csrf(who))
                textarea #yaml name="yaml" rows="30" spellcheck="false" { (yaml) }
                label for="comment" { "Comment (kept in the history)" }
                input #comment type="text" name="comment" value=(comment);
                div.actions {
                    button #validate type="submit" formaction="/console/policies/validate" { "Validate" }
                    button #publish type="submit" formaction="/console/policies/publish" { "Publish" }
                }
            }
            @if !located.is_empty() {
                h2 { "Where" }
                pre.listing #listing {
                    @for (i, text) in yaml.lines().enumerate() {
                        @let n = u32::try_from(i + 1).unwrap_or(u32::MAX);
                        @let here: Vec<&(Option<(u32, u32)>, &String)> = located.iter().filter(|(at, _)| at.map(|a| a.0) == Some(n)).collect();
                        span class=(if here.is_empty() { "ln" } else { "ln err" }) data-line=(n) {
                            span.no { (format!("{n:>4} ")) } (text)
                        }
                        "\n"
                        @for (at, e) in here {
                            @if let Some((_, c)) = at {
                                @if *c <= CARET_COLUMNS {
                                    span.caret { (format!("     {}^ {e}", " ".repeat(c.saturating_sub(1) as usize))) } "\n"
                                } @else {
                                    span.caret { (format!("     ^ (column {c}) {e}")) } "\n"
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

pub fn gateways(who: &Signed, published: u64, stored: u64, list: &[GatewayConn]) -> Markup {
    let now = chrono::Utc::now().timestamp_millis();
    layout(
        "Gateways",
        Some(who),
        "gateways",
        html! {
            p { "This instance publishes revision " strong #published-revision { (published) } " (the database's latest is " (stored) ")." }
            table #gateways {
                thead { tr { th { "Token" } th { "Client" } th { "Connected" } th { "Revision" } th { "Drift" } th { "Last seen" } } }
                tbody {
                    @for g in list {
                        tr {
                            td { (g.actor) }
                            td { (g.agent) }
                            td { (crate::store::rfc3339_ms(g.connected_ms)) }
                            td.num { (g.revision) }
                            td.num { (stored.saturating_sub(g.revision)) }
                            td { (format!("{:.1}", (now - g.last_seen_ms).max(0) as f64 / 1000.0)) " s ago" }
                        }
                    }
                    @if list.is_empty() { tr { td colspan="6" { "no gateway is following this instance" } } }
                }
            }
        },
    )
}

pub fn changes(who: &Signed, list: &[Change]) -> Markup {
    layout(
        "Changes",
        Some(who),
        "changes",
        html! {
            table #changes {
                thead { tr { th { "Revision" } th { "Time" } th { "Actor" } th { "Kind" } th { "Target" } th { "Detail" } } }
                tbody {
                    @for c in list {
                        tr {
                            td.num { (c.revision) } td { (c.at) } td { (c.actor) }
                            td { (c.kind) } td { (c.target) } td { (c.detail) }
                        }
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::locate;

    #[test]
    fn errors_are_located() {
        assert_eq!(
            locate("control-plane policy v2:6:3: tiers.free: unknown field"),
            Some((6, 3))
        );
        assert_eq!(locate("policy: unreadable"), None);
    }
}
