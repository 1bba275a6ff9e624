//! The page shell (header, navigation, who is signed in), the CSS and the
//! small script for live counters and job progress. Everything is compiled
//! into the binary and served from `/static/` (no build step, nothing from
//! a CDN); pages carry no inline script or style, so the Content Security
//! Policy ([`super::CSP`]) allows none.

use maud::{html, Markup, DOCTYPE};

use super::auth::SignedIn;

pub const CSS: &str = r#"
:root{--bg:#f4f6f9;--card:#fff;--ink:#1d2733;--muted:#5d6b7a;--line:#dde3ea;--brand:#1f5fbf;--brand-d:#174a96;
--ok:#1e8e4e;--ok-bg:#e6f4ec;--bad:#c0392b;--bad-bg:#fbeaea;--warn:#b7791f;--warn-bg:#fdf3e1;--mono:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;background:var(--bg);color:var(--ink)}
a{color:var(--brand);text-decoration:none}a:hover{text-decoration:underline}
header.top{display:flex;align-items:center;gap:24px;background:#14233a;color:#fff;padding:0 24px;height:52px}
header.top .brand{font-weight:700;font-size:16px;letter-spacing:.3px;color:#fff}
header.top .brand span{color:#7fb0ff}
nav.main{display:flex;gap:4px;flex:1}
nav.main a{color:#c9d6e8;padding:6px 12px;border-radius:6px}
nav.main a.on,nav.main a:hover{background:#243a5c;color:#fff;text-decoration:none}
.who{display:flex;align-items:center;gap:10px;color:#c9d6e8;font-size:13px}
.who form{margin:0}
.role{font-size:11px;text-transform:uppercase;letter-spacing:.5px;padding:2px 7px;border-radius:10px;background:#243a5c;color:#9fc3ff}
main{max-width:1280px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 10px}
.sub{color:var(--muted);margin:0 0 18px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 18px;margin-bottom:16px}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:12px;margin-bottom:16px}
.tile{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 16px}
.tile .n{font-size:26px;font-weight:700}.tile .l{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.4px}
.tile.bad .n{color:var(--bad)}.tile.ok .n{color:var(--ok)}.tile.warn .n{color:var(--warn)}
table{width:100%;border-collapse:collapse;background:var(--card);border:1px solid var(--line);border-radius:10px;overflow:hidden}
th,td{text-align:left;padding:8px 10px;border-bottom:1px solid var(--line);vertical-align:top}
th{background:#f0f3f7;font-size:12px;text-transform:uppercase;letter-spacing:.4px;color:var(--muted);font-weight:600}
tr:last-child td{border-bottom:0}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
code,.mono{font-family:var(--mono);font-size:12.5px}
pre{font-family:var(--mono);font-size:12.5px;background:#0f1b2d;color:#dbe7f7;padding:12px 14px;border-radius:8px;overflow:auto;max-height:420px}
.pill{display:inline-block;font-size:11.5px;padding:1px 8px;border-radius:10px;background:#eef2f7;color:var(--muted);font-weight:600}
.pill.bad{background:var(--bad-bg);color:var(--bad)}.pill.ok{background:var(--ok-bg);color:var(--ok)}.pill.warn{background:var(--warn-bg);color:var(--warn)}
.btn{display:inline-block;border:1px solid var(--brand);background:var(--brand);color:#fff;border-radius:6px;padding:6px 12px;font:inherit;font-weight:600;cursor:pointer}
.btn:hover{background:var(--brand-d);text-decoration:none}
.btn.ghost{background:#fff;color:var(--brand)}.btn.ghost:hover{background:#eef4ff}
.btn.danger{background:var(--bad);border-color:var(--bad)}.btn.danger:hover{background:#992d22}
.btn.small{padding:3px 9px;font-size:12.5px}
form.inline{display:inline}
.filters{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-end}
.filters label{display:flex;flex-direction:column;font-size:12px;color:var(--muted);gap:3px}
input[type=text],input[type=password],input[type=search],select{font:inherit;padding:6px 8px;border:1px solid #c5cfdb;border-radius:6px;background:#fff;min-width:140px}
.msg{padding:10px 14px;border-radius:8px;margin-bottom:16px;border:1px solid}
.msg.bad{background:var(--bad-bg);border-color:#f0c4bf;color:#8e2a20}.msg.ok{background:var(--ok-bg);border-color:#bfe3cd;color:#17663a}
.msg.info{background:#eef4ff;border-color:#c8dafc;color:#1d3f7a}
.bar{height:14px;background:#e6ebf1;border-radius:7px;overflow:hidden}.bar>div{height:100%;background:var(--brand);transition:width .3s}
.checks li{list-style:none;margin:0 0 10px;padding:10px 12px;border:1px solid var(--line);border-radius:8px;background:#fff}
.checks{padding:0}.checks .mark{font-weight:700;margin-right:6px}.checks .ok .mark{color:var(--ok)}.checks .bad .mark{color:var(--bad)}
.checks .fix{margin-top:4px;color:#8e2a20}.checks .halo{margin-top:4px;font-family:var(--mono);font-size:12.5px;color:var(--muted)}
.daily{display:grid;grid-template-columns:repeat(auto-fill,minmax(92px,1fr));gap:6px}
.daily .d{background:#fff;border:1px solid var(--line);border-radius:8px;padding:6px 8px;font-size:12px}
.daily .d b{display:block;color:var(--muted);font-weight:600}.daily .d .f{color:var(--bad)}
.login{max-width:380px;margin:80px auto}.login h1{margin-bottom:16px}
.login label{display:block;margin-bottom:12px;font-size:13px;color:var(--muted)}.login input{width:100%;margin-top:4px}
.pager{display:flex;gap:8px;align-items:center;margin-top:12px}
table.settings th{width:230px;text-transform:none;font-size:12.5px;letter-spacing:0}table.settings td,table.settings th{padding:5px 10px}
.muted{color:var(--muted)}.right{text-align:right}.row{display:flex;gap:10px;align-items:center;flex-wrap:wrap}
.mt0{margin-top:0}.m0{margin:0}.grow{flex:1}.wauto{width:auto}.my12{margin:12px 0}
.mb8{margin-bottom:8px}.mb10{margin-bottom:10px}.mb12{margin-bottom:12px}.mb14{margin-bottom:14px}
"#;

pub const JS: &str = r#"
// Live values: an element with data-live="a.b.c" shows that field of each
// server-sent event; data-live-max points at the total for a progress bar.
(function(){
  function get(o,p){return p.split('.').reduce(function(a,k){return a==null?a:a[k]},o)}
  // Widths from data-pct (the CSP allows no style attribute in the markup).
  document.querySelectorAll('[data-pct]').forEach(function(el){el.style.width=el.getAttribute('data-pct')+'%'});
  document.querySelectorAll('[data-back]').forEach(function(a){
    a.addEventListener('click',function(e){e.preventDefault();history.back()});
  });
  document.querySelectorAll('[data-sse]').forEach(function(root){
    var es=new EventSource(root.getAttribute('data-sse'));
    es.onmessage=function(e){
      var d; try{d=JSON.parse(e.data)}catch(_){return}
      root.querySelectorAll('[data-live]').forEach(function(el){
        var v=get(d,el.getAttribute('data-live')); if(v!==undefined&&v!==null) el.textContent=v;
      });
      root.querySelectorAll('[data-bar]').forEach(function(el){
        var n=get(d,el.getAttribute('data-bar')),t=get(d,el.getAttribute('data-bar-of'));
        el.style.width=(t>0?Math.min(100,100*n/t):(d.finished?100:0))+'%';
      });
      if(d.finished){es.close(); var f=root.querySelector('[data-when-finished]'); if(f) f.hidden=false;}
    };
  });
  document.querySelectorAll('[data-select-all]').forEach(function(box){
    box.addEventListener('change',function(){
      document.querySelectorAll('input[name=id]').forEach(function(c){c.checked=box.checked});
    });
  });
})();
"#;

/// The navigation entries: (path, label).
const NAV: [(&str, &str); 8] = [
    ("/", "Overview"),
    ("/activity", "Activity"),
    ("/dead", "Dead letters"),
    ("/mappings", "Item mappings"),
    ("/reconcile", "Reconcile"),
    ("/connections", "Connections"),
    ("/jobs", "Jobs"),
    ("/audit", "Audit"),
];

/// A signed-in page.
pub fn page(title: &str, active: &str, who: &SignedIn, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · halosync console" }
                link rel="stylesheet" href="/static/console.css";
            }
            body {
                header.top {
                    a.brand href="/" { "halo" span { "sync" } }
                    nav.main {
                        @for (href, label) in NAV {
                            a href=(href) class=[(href == active).then_some("on")] { (label) }
                        }
                    }
                    div.who {
                        span { (who.user) }
                        span.role { (who.role.as_str()) }
                        form.inline method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(who.csrf);
                            button.btn.ghost.small type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
                script src="/static/console.js" {}
            }
        }
    }
}

/// A page for someone not signed in (the sign-in form, errors).
pub fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · halosync console" }
                link rel="stylesheet" href="/static/console.css";
            }
            body { main { (body) } script src="/static/console.js" {} }
        }
    }
}

/// The hidden CSRF field every state-changing form carries.
pub fn csrf(who: &SignedIn) -> Markup {
    html! { input type="hidden" name="csrf" value=(who.csrf); }
}

/// "3 minutes ago"-style relative time plus the exact UTC time on hover.
pub fn when(t: Option<&chrono::DateTime<chrono::Utc>>) -> Markup {
    match t {
        None => html! { span.muted { "–" } },
        Some(t) => {
            let now = chrono::Utc::now();
            html! { span title=(t.to_rfc3339()) { (crate::table::when(Some(t), &now)) } }
        }
    }
}
