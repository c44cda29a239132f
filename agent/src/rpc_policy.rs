//! An `rpc:` listener's configuration and its mirror policy: which requests are copied, decided
//! per request.
//!
//! `rules` are tried in order and the first whose `match` holds decides, else the listener's own
//! `commands` and `percentage` do, as `mirror.rules` do for HTTP. With `sample_by: key`, the draw
//! is the hash of the command's first key ([`crate::policy::key_hash`]), so a key's commands are
//! all copied or none, on every agent replica. Commands that cannot be replayed alone on a
//! shared connection are never copied, whatever the rules say (see
//! [`teeway_rpc::redis::Class::Never`]); they count as not sampled, under
//! `rule_matched{rule="unmirrorable"}`.
//!
//! Like the HTTP policy, a built policy is immutable and a reload swaps it whole; its rules keep
//! their paces across reloads by name.

use std::net::SocketAddr;
use std::sync::Arc;

use metrics::Counter;
use teeway_rpc::dubbo::{Attachment, Invocation};
use teeway_rpc::redis::{Class, Command};
use teeway_rpc::thrift::Head;
use teeway_runtime::config::{self as cfg, Problems, Section};
use teeway_runtime::metrics::Registry;
use teeway_runtime::yaml::Value;
use teeway_wire::RpcProtocol;

use crate::pace::Pace;
use crate::policy::{choose, Chosen, Fraction};

/// Requests matched by each rule of an `rpc:` listener (`default`: by none; `unmirrorable`:
/// commands never copied).
pub const RPC_RULE_MATCHED_TOTAL: &str = "teeway_agent_rpc_rule_matched_total";
/// The share of each rpc rule's sampled requests copied while the gateway sheds them.
pub const RPC_PACE_RATIO: &str = "teeway_agent_rpc_pace_ratio";

/// Default `rpc[].max_message_bytes`.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 1024 * 1024;
/// Most arguments of a command read to decide on it (its name, its keys, `STREAMS`).
pub const MAX_ARGS: usize = 16;

/// `rpc[i]`: a listener proxying one RPC protocol to its primary, copying requests one by one.
#[derive(Debug, Clone)]
pub struct RpcListenerConfig {
    /// Names the listener in metrics and to the gateway, whose `rpc_routes` route on it.
    pub name: String,
    /// The protocol its clients speak.
    pub protocol: RpcProtocol,
    /// Where clients connect.
    pub listen: SocketAddr,
    /// The real service, host and port.
    pub primary: (String, u16),
    /// Which requests are copied (reloadable).
    pub policy: RpcPolicyConfig,
}

/// What a policy decides on, whatever the protocol: a Redis command or a Thrift call.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// The service (Thrift's multiplexed service name); empty where there is none.
    pub service: &'a [u8],
    /// The method: a Redis command's name as sent, a Thrift method.
    pub method: &'a [u8],
    /// What the command table says of it (Redis); other protocols' calls are taken as writes.
    pub class: Class,
    /// The first key (Redis).
    pub key: Option<&'a [u8]>,
    /// Its attachments (Dubbo).
    pub attachments: &'a [Attachment],
}

impl<'a> Call<'a> {
    /// A Redis command.
    pub fn redis(command: &Command<'a>) -> Self {
        Call {
            service: b"",
            method: command.name(),
            class: command.info().class,
            key: command.first_key(),
            attachments: &[],
        }
    }

    /// A Thrift call.
    pub fn thrift(head: &'a Head) -> Self {
        let (service, method) = head.service_and_method();
        Call {
            service,
            method,
            class: Class::Write,
            key: None,
            attachments: &[],
        }
    }

    /// A Dubbo invocation (its service path and method; its attachments, when read).
    pub fn dubbo(invocation: &'a Invocation) -> Self {
        Call {
            service: invocation.service.as_bytes(),
            method: invocation.method.as_bytes(),
            class: Class::Write,
            key: None,
            attachments: &invocation.attachments,
        }
    }

    /// The string value of attachment `name`.
    fn attachment(&self, name: &str) -> Option<&'a str> {
        self.attachments
            .iter()
            .find(|a| a.name == name)
            .and_then(|a| a.value.as_deref())
    }
}

/// What keeps a sampling decision consistent (`sample_by`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SampleBy {
    /// Redis: the command's first key.
    Key,
    /// Dubbo: the value of this attachment.
    Attachment(String),
}

/// `rpc[].redact`: attachments scrubbed from Dubbo copies (the primary gets them whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentRedaction {
    /// Names scrubbed (compared without regard to case).
    pub names: Vec<String>,
    /// `mask`: their value replaced by this; `None`: removed.
    pub mask: Option<String>,
}

/// Attachments that never leave production unless `redact.pass` names them: Dubbo's own
/// provider token, and what carries credentials by custom.
pub const DEFAULT_REDACTED_ATTACHMENTS: [&str; 10] = [
    "token",
    "authorization",
    "password",
    "passwd",
    "secret",
    "access_token",
    "accesstoken",
    "api_key",
    "apikey",
    "cookie",
];

/// The value a masked attachment gets.
pub const MASK: &str = "[redacted]";

impl AttachmentRedaction {
    /// Whether `name` is scrubbed.
    pub fn covers(&self, name: &str) -> bool {
        self.names.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

impl Default for AttachmentRedaction {
    fn default() -> Self {
        AttachmentRedaction {
            names: DEFAULT_REDACTED_ATTACHMENTS.map(str::to_owned).to_vec(),
            mask: None,
        }
    }
}

/// Which commands a rule (or the listener's default) takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commands {
    /// Every command that can be copied.
    All,
    /// Those that may change data (the command table's `write` flag, scripts included): a
    /// shadow kept in step with the primary's data, without its read load.
    Writes,
    /// These, in capitals.
    Listed(Vec<String>),
}

impl Commands {
    fn takes(&self, call: &Call<'_>) -> bool {
        match self {
            Commands::All => true,
            Commands::Writes => call.class == Class::Write,
            Commands::Listed(names) => names
                .iter()
                .any(|n| n.as_bytes().eq_ignore_ascii_case(call.method)),
        }
    }

    fn read(v: &Value) -> Result<Self, String> {
        match v {
            Value::String(s) if s == "all" => Ok(Commands::All),
            Value::String(s) if s == "writes" => Ok(Commands::Writes),
            Value::Sequence(items) if !items.is_empty() => items
                .iter()
                .map(|item| {
                    let name = cfg::nonempty_string(item)?;
                    if !name.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(format!("`{name}` is not a command name"));
                    }
                    // Naming one that is never copied would be a rule that can never hold.
                    if teeway_rpc::redis::Info::of(name.as_bytes()).class == Class::Never {
                        return Err(format!(
                            "`{name}` is never copied (it carries or changes its connection's state, or administers the server)"
                        ));
                    }
                    Ok(name.to_ascii_uppercase())
                })
                .collect::<Result<_, _>>()
                .map(Commands::Listed),
            _ => Err("is not a command set".into()),
        }
    }
}

/// A key pattern as Redis's `KEYS` takes it, `*` and `?` only: `session:*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPattern(Vec<u8>);

impl KeyPattern {
    /// Whether `key` matches.
    pub fn matches(&self, key: &[u8]) -> bool {
        glob(&self.0, key)
    }
}

/// `*` (any run of bytes) and `?` (any one byte) over bytes; iterative, linear in practice.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// One rule as configured.
#[derive(Debug, Clone)]
pub struct RpcRuleConfig {
    /// Its name (`rules[i]` when none is given).
    pub name: String,
    /// `match.commands`.
    pub commands: Option<Commands>,
    /// `match.keys`.
    pub keys: Option<KeyPattern>,
    /// `match.service`: services taken (exact names).
    pub services: Option<Vec<String>>,
    /// `match.method`: methods taken (exact names).
    pub methods: Option<Vec<String>>,
    /// `match.attachments` (Dubbo): each named attachment present with a string value the
    /// regex finds.
    pub attachments: Vec<(String, regex::Regex)>,
    /// `percentage`.
    pub fraction: Fraction,
}

impl RpcRuleConfig {
    fn matches(&self, call: &Call<'_>) -> bool {
        let listed = |names: &Option<Vec<String>>, value: &[u8]| {
            names
                .as_ref()
                .is_none_or(|names| names.iter().any(|n| n.as_bytes() == value))
        };
        self.commands.as_ref().is_none_or(|c| c.takes(call))
            && self
                .keys
                .as_ref()
                .is_none_or(|k| call.key.is_some_and(|key| k.matches(key)))
            && listed(&self.services, call.service)
            && listed(&self.methods, call.method)
            && self
                .attachments
                .iter()
                .all(|(name, re)| call.attachment(name).is_some_and(|v| re.is_match(v)))
    }
}

/// What decides which requests an `rpc:` listener copies.
#[derive(Debug, Clone)]
pub struct RpcPolicyConfig {
    /// The share of the requests no rule matches that is copied.
    pub percentage: f64,
    /// The commands copied when no rule matches.
    pub commands: Commands,
    /// `sample_by`: the draw is the hash of a key or an attachment.
    pub sample_by: Option<SampleBy>,
    /// `redact` (Dubbo attachments).
    pub redaction: AttachmentRedaction,
    /// First match wins.
    pub rules: Vec<RpcRuleConfig>,
    /// Requests larger than this are not copied (counted `message_too_large`).
    pub max_message_bytes: u64,
    /// `follow_shedding`, as for HTTP.
    pub follow_shedding: bool,
}

impl RpcPolicyConfig {
    /// Every command copied at `percentage`.
    pub fn simple(percentage: f64) -> Self {
        Self {
            percentage,
            commands: Commands::All,
            sample_by: None,
            redaction: AttachmentRedaction::default(),
            rules: Vec::new(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            follow_shedding: true,
        }
    }

    /// The policy of the listener `listener`, its counters registered in `registry`; rules
    /// keep the paces they had in `previous`.
    pub fn build(
        &self,
        listener: &str,
        registry: Option<&Registry>,
        previous: Option<&RpcPolicy>,
    ) -> RpcPolicy {
        let counter = |rule: &str| {
            registry.map_or_else(Counter::noop, |r| {
                r.counter_labels(
                    RPC_RULE_MATCHED_TOTAL,
                    "Requests matched by each rule of an rpc listener (default: by none; unmirrorable: never copied)",
                    &[("listener", listener.to_owned()), ("rule", rule.to_owned())],
                )
            })
        };
        let pace = |rule: &str| {
            let kept = previous.and_then(|p| {
                if rule == "default" {
                    return Some(&p.default_pace);
                }
                p.rules.iter().find(|r| &*r.name == rule).map(|r| &r.pace)
            });
            if let Some(kept) = kept {
                return kept.clone();
            }
            let gauge = registry.map_or_else(metrics::Gauge::noop, |r| {
                r.gauge_owned(
                    RPC_PACE_RATIO,
                    "Share of each rpc rule's sampled requests copied: below 1 while the gateway sheds them",
                    &[("listener", listener.to_owned()), ("rule", rule.to_owned())],
                )
            });
            Arc::new(Pace::new(format!("{listener}/{rule}").into(), gauge))
        };
        RpcPolicy {
            rules: self
                .rules
                .iter()
                .map(|r| RpcRule {
                    name: r.name.as_str().into(),
                    config: r.clone(),
                    matched: counter(&r.name),
                    pace: pace(&r.name),
                })
                .collect(),
            commands: self.commands.clone(),
            fraction: Fraction::percent(self.percentage),
            default_matched: counter("default"),
            default_pace: pace("default"),
            unmirrorable: counter("unmirrorable"),
            sample_by: self.sample_by.clone(),
            redaction: self.redaction.clone(),
            max_message_bytes: self.max_message_bytes,
            follow_shedding: self.follow_shedding,
        }
    }
}

/// A rule in force.
#[derive(Debug)]
struct RpcRule {
    name: Arc<str>,
    config: RpcRuleConfig,
    matched: Counter,
    pace: Arc<Pace>,
}

/// An `rpc:` listener's policy in force; see the module docs.
#[derive(Debug)]
pub struct RpcPolicy {
    rules: Vec<RpcRule>,
    commands: Commands,
    fraction: Fraction,
    default_matched: Counter,
    default_pace: Arc<Pace>,
    unmirrorable: Counter,
    sample_by: Option<SampleBy>,
    /// Attachments scrubbed from Dubbo copies.
    pub redaction: AttachmentRedaction,
    /// Requests larger than this are not copied.
    pub max_message_bytes: u64,
    follow_shedding: bool,
}

impl RpcPolicy {
    /// Whether `call` is copied, and by which rule; `copyable` is what the connection's
    /// session said (`false`: it is never copied). `draw` is random, for requests without a key.
    pub fn decide(
        &self,
        call: &Call<'_>,
        copyable: bool,
        draw: impl FnOnce() -> u64,
    ) -> Option<Chosen<'_>> {
        if !copyable {
            self.unmirrorable.increment(1);
            return None;
        }
        let rule = self.rules.iter().find(|r| r.config.matches(call));
        let (fraction, pace) = match rule {
            Some(rule) => {
                rule.matched.increment(1);
                (rule.config.fraction, &rule.pace)
            }
            None => {
                self.default_matched.increment(1);
                if !self.commands.takes(call) {
                    return None;
                }
                (self.fraction, &self.default_pace)
            }
        };
        choose(
            rule.map(|r| &r.name),
            fraction,
            self.follow_shedding.then_some(pace),
            || match &self.sample_by {
                Some(SampleBy::Key) => call.key,
                Some(SampleBy::Attachment(name)) => call.attachment(name).map(str::as_bytes),
                None => None,
            },
            draw,
        )
    }

    /// Whether a request over `max_message_bytes` would have been copied (its share drawn as
    /// any other's), to count it.
    pub fn wanted(&self, call: &Call<'_>, copyable: bool) -> bool {
        self.decide(call, copyable, || fastrand::u64(..)).is_some()
    }
}

/// `rpc:`, the per-request RPC listeners; entries with problems are left out (the problems
/// recorded). Each comes with its path (`rpc[i]`), for problems found later.
pub fn rpc_block(root: &mut Section<'_>, p: &mut Problems) -> Vec<(String, RpcListenerConfig)> {
    let mut out = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for mut r in root.sections(p, "rpc") {
        let name = r.required(
            p,
            "name",
            "name the listener (letters, digits, `-`, `_`, `.`), such as `name: redis`; the gateway's rpc_routes use it",
            cfg::listener_name,
        );
        if let Some(name) = &name {
            if names.contains(name) {
                p.push(
                    r.path_of("name"),
                    None,
                    format!("`{name}` names an earlier rpc listener too"),
                    "give each rpc listener its own name",
                );
            }
            names.push(name.clone());
        }
        let protocol = r.required(
            p,
            "protocol",
            "use `protocol: redis`, `thrift` or `dubbo`",
            protocol,
        );
        let listen = r.required(
            p,
            "listen",
            "give the address clients connect to, such as `listen: 0.0.0.0:6380`",
            cfg::socket_addr,
        );
        let primary = r.required(
            p,
            "primary",
            "give the real service as host:port, such as `primary: redis-primary:6379`",
            cfg::host_port,
        );
        let policy = read_policy(&mut r, p, protocol.unwrap_or(RpcProtocol::Redis));
        let path = r.path().to_owned();
        r.finish(p);
        if let (Some(name), Some(protocol), Some(listen), Some(primary)) =
            (name, protocol, listen, primary)
        {
            out.push((
                path,
                RpcListenerConfig {
                    name,
                    protocol,
                    listen,
                    primary,
                    policy,
                },
            ));
        }
    }
    out
}

/// `protocol:` of an `rpc:` listener (and of a gateway's `rpc_routes`).
pub fn protocol(v: &Value) -> Result<RpcProtocol, String> {
    RpcProtocol::named(&cfg::string(v)?)
        .ok_or_else(|| "is not a protocol teeway reads per request".into())
}

/// Records a problem for `key` of `section` when it is there: it is for Redis listeners only.
fn redis_only(section: &mut Section<'_>, p: &mut Problems, key: &'static str, fix: &str) {
    if section.get(key).is_some() {
        p.push(
            section.path_of(key),
            None,
            "is for Redis listeners (`protocol: redis`)",
            fix,
        );
    }
}

/// `redact:` of a Dubbo listener: `attachments` (added to the defaults), `pass` (taken out of
/// them), `action` (`remove` or `mask`).
fn read_attachment_redaction(r: &mut Section<'_>, p: &mut Problems) -> AttachmentRedaction {
    let mut red = r.section(p, "redact");
    let mut redaction = AttachmentRedaction::default();
    let fix = "list attachment names, such as [x-user-token]";
    if let Some(more) = red.list(p, "attachments", fix, cfg::nonempty_string) {
        redaction.names.extend(more);
    }
    if let Some(pass) = red.list(p, "pass", fix, cfg::nonempty_string) {
        redaction
            .names
            .retain(|n| !pass.iter().any(|x| x.eq_ignore_ascii_case(n)));
    }
    redaction.mask = red
        .optional(
            p,
            "action",
            "use remove (default) or mask",
            |v| match cfg::string(v)?.as_str() {
                "remove" => Ok(None),
                "mask" => Ok(Some(MASK.to_owned())),
                _ => Err("is not a redaction action".into()),
            },
        )
        .flatten();
    red.finish(p);
    redaction
}

fn read_percentage(v: &Value) -> Result<Fraction, String> {
    match v {
        Value::String(s) if s == "off" => Ok(Fraction::OFF),
        Value::Bool(false) => Ok(Fraction::OFF),
        other => cfg::percentage(other).map(Fraction::percent),
    }
}

const COMMANDS_FIX: &str =
    "use `all`, `writes` (commands that may change data), or a list such as [SET, DEL]";

fn read_policy(r: &mut Section<'_>, p: &mut Problems, protocol: RpcProtocol) -> RpcPolicyConfig {
    let redis = protocol == RpcProtocol::Redis;
    let calls_fix = "rules of a Thrift listener match on `service` and `method`";
    let percentage = r
        .optional(
            p,
            "percentage",
            "use a number from 0 to 100 (the share of requests copied)",
            cfg::percentage,
        )
        .unwrap_or(100.0);
    let (commands, sample_by) = if redis {
        let commands = r
            .optional(p, "commands", COMMANDS_FIX, Commands::read)
            .unwrap_or(Commands::All);
        let sample_by = r.optional(
            p,
            "sample_by",
            "use `key` (the same key, the same decision) or leave it out (a random draw)",
            |v| match cfg::string(v)?.as_str() {
                "key" => Ok(SampleBy::Key),
                _ => Err("is not a sampling key".into()),
            },
        );
        (commands, sample_by)
    } else if protocol == RpcProtocol::Dubbo {
        redis_only(r, p, "commands", calls_fix);
        let sample_by = r.optional(
            p,
            "sample_by",
            "use `attachment:NAME` (the same attachment value, the same decision), such as attachment:user",
            |v| match cfg::string(v)?.strip_prefix("attachment:") {
                Some(name) if !name.is_empty() => Ok(SampleBy::Attachment(name.to_owned())),
                _ => Err("is not a sampling key".into()),
            },
        );
        (Commands::All, sample_by)
    } else {
        redis_only(r, p, "commands", calls_fix);
        redis_only(
            r,
            p,
            "sample_by",
            "leave it out: Thrift calls are drawn at random",
        );
        (Commands::All, None)
    };
    let redaction = if protocol == RpcProtocol::Dubbo {
        read_attachment_redaction(r, p)
    } else {
        if r.get("redact").is_some() {
            p.push(
                r.path_of("redact"),
                None,
                "is for Dubbo listeners (it scrubs attachments)",
                "leave it out",
            );
        }
        AttachmentRedaction::default()
    };
    let max_message_bytes = r
        .optional(
            p,
            "max_message_bytes",
            "use a size from 1KiB to 8MiB, such as 1MiB",
            |v| match cfg::size(v)? {
                n if n < 1024 => Err("must be at least 1KiB".into()),
                // A copy is one frame, and frames stop at 16 MiB (the HTTP body limit too).
                n if n > teeway_wire::MAX_BODY_BYTES => Err(format!(
                    "must be at most {} (a copy travels as one frame)",
                    teeway_runtime::units::format_size(teeway_wire::MAX_BODY_BYTES)
                )),
                n => Ok(n),
            },
        )
        .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
    let follow_shedding = r
        .optional(
            p,
            "follow_shedding",
            "use true (default: make fewer copies of what the gateway sheds) or false",
            cfg::boolean,
        )
        .unwrap_or(true);
    let mut rules: Vec<RpcRuleConfig> = Vec::new();
    for (i, mut rule) in r.sections(p, "rules").into_iter().enumerate() {
        let name = rule
            .optional(
                p,
                "name",
                "give a short name such as sessions",
                cfg::nonempty_string,
            )
            .unwrap_or_else(|| format!("rules[{i}]"));
        if ["default", "unmirrorable"].contains(&name.as_str())
            || rules.iter().any(|r| r.name == name)
        {
            p.push(
                rule.path_of("name"),
                None,
                format!("`{name}` is taken (by another rule, or by `default` or `unmirrorable`)"),
                "give each rule a name of its own",
            );
        }
        let mut m = rule.section(p, "match");
        let (commands, keys) = if redis {
            let commands = m.optional(p, "commands", COMMANDS_FIX, Commands::read);
            let keys = m.optional(
                p,
                "keys",
                "give a key pattern such as `session:*` (`*` any run of characters, `?` any one)",
                |v| cfg::nonempty_string(v).map(|s| KeyPattern(s.into_bytes())),
            );
            (commands, keys)
        } else {
            redis_only(&mut m, p, "commands", calls_fix);
            redis_only(&mut m, p, "keys", calls_fix);
            (None, None)
        };
        let (services, methods) = if redis {
            (None, None)
        } else {
            (
                m.list(
                    p,
                    "service",
                    "list services, such as [Orders]",
                    cfg::nonempty_string,
                ),
                m.list(
                    p,
                    "method",
                    "list methods, such as [placeOrder]",
                    cfg::nonempty_string,
                ),
            )
        };
        let mut attachments = Vec::new();
        if protocol == RpcProtocol::Dubbo {
            let path = m.path_of("attachments");
            match m.get("attachments") {
                None => {}
                Some(Value::Mapping(map)) => {
                    for (name, want) in map {
                        let re = want.as_str().map(regex::Regex::new);
                        match (name.as_str(), re) {
                            (Some(name), Some(Ok(re))) => attachments.push((name.to_owned(), re)),
                            _ => p.push(
                                &path,
                                Some(want),
                                "holds an entry that is not `name: regex`",
                                "give each attachment's name and a regex its value must match, such as `user: \"^beta-\"`",
                            ),
                        }
                    }
                }
                Some(other) => p.push(
                    path,
                    Some(other),
                    "must be a mapping of attachment names to regexes",
                    "such as `attachments: { user: \"^beta-\" }`",
                ),
            }
        }
        m.finish(p);
        let fraction = rule
            .required(
                p,
                "percentage",
                "use a number from 0 to 100 (such as 5 or 0.01), or off",
                read_percentage,
            )
            .unwrap_or(Fraction::OFF);
        rule.finish(p);
        rules.push(RpcRuleConfig {
            name,
            commands,
            keys,
            services,
            methods,
            attachments,
            fraction,
        });
    }
    RpcPolicyConfig {
        percentage,
        commands,
        sample_by,
        redaction,
        rules,
        max_message_bytes,
        follow_shedding,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(text: &'static [u8]) -> Command<'static> {
        Command::parse(text, MAX_ARGS).expect("test input")
    }

    #[test]
    fn a_command_list_refuses_commands_that_are_never_copied() {
        let list = |text: &str| Commands::read(&teeway_runtime::yaml::parse(text).expect("yaml"));
        assert_eq!(
            list("[set, JSON.SET]"),
            Ok(Commands::Listed(vec!["SET".into(), "JSON.SET".into()])),
            "a module's command is taken as written"
        );
        let refused = list("[SET, auth]").expect_err("AUTH is never copied");
        assert!(refused.contains("`auth` is never copied"), "{refused}");
        assert!(list("[MULTI]").is_err());
    }

    #[test]
    fn key_patterns_glob_as_redis_does() {
        let k = |p: &str, key: &str| KeyPattern(p.as_bytes().to_vec()).matches(key.as_bytes());
        assert!(k("session:*", "session:17"));
        assert!(k("session:*", "session:"));
        assert!(!k("session:*", "sessions:1"));
        assert!(k("*:cart:?", "user:cart:1"));
        assert!(!k("*:cart:?", "user:cart:12"));
        assert!(k("*", ""));
        assert!(k("a*b*c", "axxbyyc"));
        assert!(!k("a*b*c", "axxbyy"));
    }

    #[test]
    fn first_rule_wins_then_the_listeners_commands_decide() {
        let mut config = RpcPolicyConfig::simple(100.0);
        config.commands = Commands::Writes;
        config.rules = vec![
            RpcRuleConfig {
                name: "no-sessions".into(),
                commands: None,
                keys: Some(KeyPattern(b"session:*".to_vec())),
                services: None,
                methods: None,
                attachments: Vec::new(),
                fraction: Fraction::OFF,
            },
            RpcRuleConfig {
                name: "gets".into(),
                commands: Some(Commands::Listed(vec!["GET".into()])),
                keys: None,
                services: None,
                methods: None,
                attachments: Vec::new(),
                fraction: Fraction::percent(100.0),
            },
        ];
        let policy = config.build("redis", None, None);
        let decide = |text: &'static [u8]| {
            policy
                .decide(&Call::redis(&command(text)), true, || 0)
                .map(|c| c.rule.map(|r| r.to_string()))
        };
        assert_eq!(decide(b"SET session:1 x\r\n"), None, "rule off");
        assert_eq!(decide(b"get user:1\r\n"), Some(Some("gets".into())));
        assert_eq!(
            decide(b"SET user:1 x\r\n"),
            Some(None),
            "a write, by default"
        );
        assert_eq!(
            decide(b"HGET user:1 f\r\n"),
            None,
            "a read, not copied by default"
        );
        assert!(policy
            .decide(&Call::redis(&command(b"SET a b\r\n")), false, || 0)
            .is_none());
    }

    #[test]
    fn sampling_by_key_keeps_a_keys_commands_together() {
        let mut config = RpcPolicyConfig::simple(50.0);
        config.sample_by = Some(SampleBy::Key);
        let policy = config.build("redis", None, None);
        let mut copied = 0;
        for i in 0..200u32 {
            let set = format!(
                "*3\r\n$3\r\nSET\r\n${}\r\nk{i}\r\n$1\r\nv\r\n",
                format!("k{i}").len()
            );
            let get = format!("*2\r\n$3\r\nGET\r\n${}\r\nk{i}\r\n", format!("k{i}").len());
            let a = policy.decide(
                &Call::redis(&Command::parse(set.as_bytes(), 4).expect("test input")),
                true,
                || fastrand::u64(..),
            );
            let b = policy.decide(
                &Call::redis(&Command::parse(get.as_bytes(), 4).expect("test input")),
                true,
                || fastrand::u64(..),
            );
            assert_eq!(a.is_some(), b.is_some(), "k{i}");
            copied += usize::from(a.is_some());
        }
        assert!(
            (60..140).contains(&copied),
            "about half of 200 keys: {copied}"
        );
    }

    #[test]
    fn the_block_reads_with_defaults_and_names_its_problems() {
        let doc = teeway_runtime::yaml::parse(
            "rpc:\n  - name: redis\n    protocol: redis\n    listen: 127.0.0.1:6380\n    primary: redis:6379\n    commands: writes\n    sample_by: key\n    rules:\n      - name: sessions\n        match: { keys: \"session:*\", commands: [set, del] }\n        percentage: 30\n  - name: redis\n    protocol: memcached\n    listen: 127.0.0.1:6381\n    primary: x:1\n    rules:\n      - { name: default, percentage: 5 }\n  - name: orders\n    protocol: thrift\n    listen: 127.0.0.1:9090\n    primary: orders:9090\n    commands: writes\n    rules:\n      - { match: { keys: \"a*\", method: [placeOrder] }, percentage: 5 }\n",
        )
        .expect("test input");
        let mut p = Problems::default();
        let mut root = Section::root(&doc, &mut p);
        let read = rpc_block(&mut root, &mut p);
        assert_eq!(read.len(), 2, "the second entry cannot be used at all");
        let thrift = &read[1].1;
        assert_eq!(thrift.protocol, RpcProtocol::Thrift);
        assert_eq!(
            thrift.policy.rules[0].methods,
            Some(vec!["placeOrder".to_owned()])
        );
        let c = &read[0].1;
        assert_eq!(c.primary, ("redis".into(), 6379));
        assert_eq!(c.policy.commands, Commands::Writes);
        assert_eq!(c.policy.sample_by, Some(SampleBy::Key));
        assert_eq!(
            c.policy.rules[0].commands,
            Some(Commands::Listed(vec!["SET".into(), "DEL".into()]))
        );
        assert_eq!(c.policy.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
        let text = p.finish(()).expect_err("problems").to_string();
        for needle in [
            "rpc[1].name",
            "rpc[1].protocol",
            "`memcached`",
            "rpc[2].commands: is for Redis listeners",
            "rpc[2].rules[0].match.keys: is for Redis listeners",
            "rpc[1].rules[0].name",
        ] {
            assert!(text.contains(needle), "{needle} in {text}");
        }
    }
}
