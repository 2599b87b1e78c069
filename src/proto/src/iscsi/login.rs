//! The login phase, target side (RFC 7143 §6.3, §11.12, §11.13).
//!
//! A [`Login`] consumes Login Request PDUs and produces Login Responses. It checks the
//! session identity (InitiatorName, SessionType, TargetName), runs the security stage (no
//! authentication or CHAP, one-way or mutual), negotiates operational keys through
//! [`keys`](super::keys), enforces the initiator ACL, and ends with a [`LoginOutcome`] or a
//! failure status. Time and randomness come from the caller (the CHAP challenge is passed in).

use std::sync::Arc;

use bytes::Bytes;

use super::chap::{self, Credentials};
use super::keys::{self, Answer, Limits, Params, Phase};
use super::pdu::{stage, LoginRequest, LoginResponse};
use super::text::{self, Pair};

/// Largest Login Response text: the MaxRecvDataSegmentLength every initiator accepts during
/// login (RFC 7143 §13.12 default).
const MAX_LOGIN_RESPONSE_TEXT: usize = 8192;

/// One target as login and discovery see it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TargetEntry {
    /// iSCSI name (IQN).
    pub name: String,
    /// TargetAlias, if any.
    pub alias: Option<String>,
    /// CHAP credentials the initiator must present; `None` means no authentication.
    pub chap: Option<Credentials>,
    /// Credentials the target answers mutual CHAP with.
    pub mutual_chap: Option<Credentials>,
    /// Initiator names allowed to log in (and to see the target in discovery); empty means
    /// everyone.
    pub allowed_initiators: Vec<String>,
    /// Target portal group tag.
    pub portal_group_tag: u16,
    /// Addresses advertised in SendTargets (`host:port`); empty means the portal the
    /// initiator connected to.
    pub portals: Vec<String>,
    /// When set, normal logins are redirected here (`host:port`, status 0x0101).
    pub redirect: Option<String>,
}

impl TargetEntry {
    /// Whether `initiator` may access this target.
    pub fn permits(&self, initiator: &str) -> bool {
        self.allowed_initiators.is_empty()
            || self
                .allowed_initiators
                .iter()
                .any(|a| a.eq_ignore_ascii_case(initiator))
    }
}

/// Everything the portal exports: the targets and discovery authentication.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Directory {
    /// Targets.
    pub targets: Vec<TargetEntry>,
    /// CHAP credentials required for discovery sessions.
    pub discovery_chap: Option<Credentials>,
    /// Credentials for mutual CHAP in discovery sessions.
    pub discovery_mutual_chap: Option<Credentials>,
}

impl Directory {
    /// The target called `name` (iSCSI names compare case-insensitively).
    pub fn target(&self, name: &str) -> Option<&TargetEntry> {
        self.targets
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name))
    }
}

/// Login status classes and details (RFC 7143 §11.13.5), as (class, detail).
pub mod status {
    /// Success.
    pub const SUCCESS: (u8, u8) = (0, 0);
    /// Target moved temporarily.
    pub const TARGET_MOVED_TEMPORARILY: (u8, u8) = (1, 1);
    /// Initiator error (miscellaneous).
    pub const INITIATOR_ERROR: (u8, u8) = (2, 0);
    /// Authentication failure.
    pub const AUTHENTICATION_FAILURE: (u8, u8) = (2, 1);
    /// Authorization failure.
    pub const AUTHORIZATION_FAILURE: (u8, u8) = (2, 2);
    /// Not found.
    pub const NOT_FOUND: (u8, u8) = (2, 3);
    /// Unsupported version.
    pub const UNSUPPORTED_VERSION: (u8, u8) = (2, 5);
    /// Missing parameter.
    pub const MISSING_PARAMETER: (u8, u8) = (2, 7);
    /// Session type not supported.
    pub const SESSION_TYPE_NOT_SUPPORTED: (u8, u8) = (2, 9);
    /// Session does not exist.
    pub const SESSION_DOES_NOT_EXIST: (u8, u8) = (2, 10);
    /// Invalid request during login.
    pub const INVALID_DURING_LOGIN: (u8, u8) = (2, 11);
    /// Target error.
    pub const TARGET_ERROR: (u8, u8) = (3, 0);
}

/// Why a login failed, for logs and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginFailure {
    /// CHAP failed or was required and not offered.
    #[error("authentication failed")]
    Authentication,
    /// The initiator is not in the target's ACL.
    #[error("initiator not authorized for the target")]
    Authorization,
    /// Malformed text, wrong stage, changed identity fields.
    #[error("initiator protocol error")]
    InitiatorError,
    /// InitiatorName or TargetName missing.
    #[error("missing parameter")]
    MissingParameter,
    /// The target does not exist.
    #[error("target not found")]
    NotFound,
    /// Redirected elsewhere (not an error for the initiator).
    #[error("redirected")]
    Redirected,
    /// A non-zero TSIH naming no session.
    #[error("session does not exist")]
    SessionDoesNotExist,
    /// Unknown SessionType.
    #[error("session type not supported")]
    SessionType,
    /// Version range excludes 0.
    #[error("unsupported version")]
    Version,
}

impl LoginFailure {
    fn status(self) -> (u8, u8) {
        match self {
            Self::Authentication => status::AUTHENTICATION_FAILURE,
            Self::Authorization => status::AUTHORIZATION_FAILURE,
            Self::InitiatorError => status::INITIATOR_ERROR,
            Self::MissingParameter => status::MISSING_PARAMETER,
            Self::NotFound => status::NOT_FOUND,
            Self::Redirected => status::TARGET_MOVED_TEMPORARILY,
            Self::SessionDoesNotExist => status::SESSION_DOES_NOT_EXIST,
            Self::SessionType => status::SESSION_TYPE_NOT_SUPPORTED,
            Self::Version => status::UNSUPPORTED_VERSION,
        }
    }
}

/// Session type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    /// SendTargets only.
    Discovery,
    /// SCSI I/O.
    Normal,
}

/// Per-connection inputs to the login.
#[derive(Debug, Clone)]
pub struct LoginSetup {
    /// The exported targets.
    pub directory: Arc<Directory>,
    /// Our negotiation limits.
    pub limits: Limits,
    /// TSIH to give the session if it completes.
    pub tsih: u16,
    /// CHAP identifier to send.
    pub chap_id: u8,
    /// CHAP challenge to send (random, fresh per connection).
    pub chap_challenge: [u8; 16],
    /// Command window (queue depth) to advertise through MaxCmdSN.
    pub cmd_window: u32,
}

/// A completed login.
#[derive(Debug, Clone)]
pub struct LoginOutcome {
    /// Discovery or normal.
    pub session_type: SessionType,
    /// InitiatorName.
    pub initiator_name: String,
    /// ISID.
    pub isid: [u8; 6],
    /// TSIH assigned.
    pub tsih: u16,
    /// CID.
    pub cid: u16,
    /// The target (normal sessions).
    pub target: Option<TargetEntry>,
    /// Negotiated parameters.
    pub params: Params,
    /// ExpCmdSN for the full feature phase.
    pub exp_cmd_sn: u32,
    /// The StatSN the next response carries.
    pub stat_sn: u32,
}

/// What the connection must do after a login request.
#[derive(Debug)]
pub enum LoginStep {
    /// Send the response and wait for the next request.
    Continue(LoginResponse, Bytes),
    /// Send the response; the login succeeded.
    Done(LoginResponse, Bytes, Box<LoginOutcome>),
    /// Send the response; then close the connection.
    Failed(LoginResponse, Bytes, LoginFailure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// Nothing negotiated yet.
    Start,
    /// AuthMethod=None agreed, or no authentication needed.
    NoneAgreed,
    /// AuthMethod=CHAP agreed; waiting for CHAP_A.
    ChapAgreed,
    /// Challenge sent; waiting for CHAP_N/CHAP_R.
    ChallengeSent,
    /// Authenticated.
    Done,
}

/// The login state machine of one connection.
#[derive(Debug)]
pub struct Login {
    setup: LoginSetup,
    first: Option<LoginRequest>,
    stage: u8,
    stat_sn: u32,
    pending_text: Vec<u8>,
    session_type: SessionType,
    initiator_name: String,
    target: Option<TargetEntry>,
    auth: Auth,
    params: Params,
    declared_mrdsl: bool,
}

impl Login {
    /// A login waiting for its first request.
    pub fn new(setup: LoginSetup) -> Self {
        let params = Params {
            target_mrdsl: setup.limits.max_recv_data_segment_length,
            ..Params::default()
        };
        Self {
            setup,
            first: None,
            stage: stage::SECURITY,
            stat_sn: 0,
            pending_text: Vec::new(),
            session_type: SessionType::Normal,
            initiator_name: String::new(),
            target: None,
            auth: Auth::Start,
            params,
            declared_mrdsl: false,
        }
    }

    fn response(&mut self, req: &LoginRequest, transit: bool, nsg: u8) -> LoginResponse {
        let first = self.first.as_ref().unwrap_or(req);
        let r = LoginResponse {
            transit,
            continue_bit: false,
            csg: req.csg,
            nsg: if transit { nsg } else { 0 },
            version_max: 0,
            version_active: 0,
            isid: first.isid,
            tsih: 0,
            itt: req.itt,
            stat_sn: self.stat_sn,
            exp_cmd_sn: first.cmd_sn,
            max_cmd_sn: first.cmd_sn.wrapping_add(self.setup.cmd_window.max(1) - 1),
            status_class: 0,
            status_detail: 0,
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        r
    }

    fn fail(&mut self, req: &LoginRequest, why: LoginFailure, text: Vec<Pair>) -> LoginStep {
        let mut r = self.response(req, false, 0);
        (r.status_class, r.status_detail) = why.status();
        LoginStep::Failed(r, text::encode(&text), why)
    }

    fn auth_required(&self) -> Option<&Credentials> {
        match self.session_type {
            SessionType::Discovery => self.setup.directory.discovery_chap.as_ref(),
            SessionType::Normal => self.target.as_ref().and_then(|t| t.chap.as_ref()),
        }
    }

    fn mutual_credentials(&self) -> Option<&Credentials> {
        match self.session_type {
            SessionType::Discovery => self.setup.directory.discovery_mutual_chap.as_ref(),
            SessionType::Normal => self.target.as_ref().and_then(|t| t.mutual_chap.as_ref()),
        }
    }

    /// Handle one Login Request PDU.
    pub fn handle(&mut self, req: &LoginRequest, data: &[u8]) -> LoginStep {
        use LoginFailure as F;
        match &self.first {
            None => {
                self.stat_sn = req.exp_stat_sn;
                if req.version_min > 0 {
                    return self.fail(req, F::Version, vec![]);
                }
                if req.csg != stage::SECURITY && req.csg != stage::OPERATIONAL {
                    return self.fail(req, F::InitiatorError, vec![]);
                }
                self.stage = req.csg;
                self.first = Some(req.clone());
            }
            Some(first) => {
                if first.isid != req.isid
                    || first.tsih != req.tsih
                    || first.cid != req.cid
                    || first.cmd_sn != req.cmd_sn
                    || req.csg != self.stage
                {
                    return self.fail(req, F::InitiatorError, vec![]);
                }
            }
        }
        if req.transit
            && (req.continue_bit
                || req.nsg <= req.csg
                || !(req.nsg == stage::OPERATIONAL || req.nsg == stage::FULL_FEATURE))
        {
            return self.fail(req, F::InitiatorError, vec![]);
        }
        if self.pending_text.len() + data.len() > 64 * 1024 {
            return self.fail(req, F::InitiatorError, vec![]);
        }
        self.pending_text.extend_from_slice(data);
        if req.continue_bit {
            // More text follows: answer with an empty response in the same stage.
            let r = self.response(req, false, 0);
            return LoginStep::Continue(r, Bytes::new());
        }
        let raw = std::mem::take(&mut self.pending_text);
        let Ok(pairs) = text::parse(&raw) else {
            return self.fail(req, F::InitiatorError, vec![]);
        };
        for (i, (k, _)) in pairs.iter().enumerate() {
            if pairs[..i].iter().any(|(k2, _)| k2 == k) {
                return self.fail(req, F::InitiatorError, vec![]);
            }
        }
        let mut out: Vec<Pair> = Vec::new();
        let first_pdu = self.initiator_name.is_empty();
        if first_pdu {
            if let Err(why) = self.identify(req, &pairs, &mut out) {
                let text = match why {
                    F::Redirected => out,
                    _ => vec![],
                };
                return self.fail(req, why, text);
            }
        }
        for (k, v) in &pairs {
            match k.as_str() {
                "InitiatorName" | "SessionType" | "TargetName" => {}
                "AuthMethod" | "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => {
                    if self.stage != stage::SECURITY {
                        return self.fail(req, F::InitiatorError, vec![]);
                    }
                }
                _ => {
                    let phase = match self.session_type {
                        SessionType::Discovery => Phase::LoginDiscovery,
                        SessionType::Normal => Phase::LoginNormal,
                    };
                    match keys::negotiate(k, v, phase, &self.setup.limits, &mut self.params) {
                        Answer::Reply(r) => out.push((k.clone(), r)),
                        Answer::Silent => {}
                        Answer::NotOperational => {
                            out.push((k.clone(), "NotUnderstood".to_string()));
                        }
                    }
                }
            }
        }
        if self.stage == stage::SECURITY {
            if let Err(why) = self.security(&pairs, &mut out) {
                return self.fail(req, why, vec![]);
            }
        } else if self.auth_required().is_some() && self.auth != Auth::Done {
            // Skipped the security stage although the target requires authentication.
            return self.fail(req, F::Authentication, vec![]);
        }
        let mut transit = false;
        if req.transit {
            let auth_ok = match self.auth_required() {
                Some(_) => self.auth == Auth::Done,
                None => matches!(self.auth, Auth::Start | Auth::NoneAgreed | Auth::Done),
            };
            if self.stage == stage::SECURITY && !auth_ok {
                if self.auth == Auth::Start && self.auth_required().is_some() {
                    return self.fail(req, F::Authentication, vec![]);
                }
            } else {
                transit = true;
            }
        }
        // Declare our receive limit once operational negotiation has started (RFC 3720
        // §5.3.3, kept by RFC 7143: it starts after the security stage), or on a jump from the
        // security stage straight to full feature. Discovery sessions use it too (Text).
        let operational =
            self.stage == stage::OPERATIONAL || (transit && req.nsg == stage::FULL_FEATURE);
        if operational && !self.declared_mrdsl {
            self.declared_mrdsl = true;
            out.push((
                "MaxRecvDataSegmentLength".into(),
                self.params.target_mrdsl.to_string(),
            ));
        }
        // During login the initiator accepts 8192 bytes per PDU; answers that do not fit
        // (thousands of unknown keys answered NotUnderstood) end the login.
        let out = text::encode(&out);
        if out.len() > MAX_LOGIN_RESPONSE_TEXT {
            return self.fail(req, F::InitiatorError, vec![]);
        }
        if transit && req.nsg == stage::FULL_FEATURE {
            let mut r = self.response(req, true, req.nsg);
            r.tsih = self.setup.tsih;
            let first = self.first.as_ref().expect("set on the first request");
            let outcome = LoginOutcome {
                session_type: self.session_type,
                initiator_name: self.initiator_name.clone(),
                isid: first.isid,
                tsih: self.setup.tsih,
                cid: first.cid,
                target: self.target.clone(),
                params: self.params.clone(),
                exp_cmd_sn: first.cmd_sn,
                stat_sn: self.stat_sn,
            };
            return LoginStep::Done(r, out, Box::new(outcome));
        }
        let r = self.response(req, transit, req.nsg);
        if transit {
            self.stage = req.nsg;
        }
        LoginStep::Continue(r, out)
    }

    /// Session identity on the first request: names, type, target lookup, ACL.
    fn identify(
        &mut self,
        req: &LoginRequest,
        pairs: &[Pair],
        out: &mut Vec<Pair>,
    ) -> Result<(), LoginFailure> {
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(k2, _)| k2 == k)
                .map(|(_, v)| v.as_str())
        };
        let Some(name) = get("InitiatorName").filter(|n| !n.is_empty()) else {
            return Err(LoginFailure::MissingParameter);
        };
        self.initiator_name = name.to_string();
        self.session_type = match get("SessionType") {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(_) => return Err(LoginFailure::SessionType),
        };
        if req.tsih != 0 {
            // We run one connection per session (MaxConnections=1), so a TSIH other than
            // zero can only name a session that does not take more connections.
            return Err(LoginFailure::SessionDoesNotExist);
        }
        if self.session_type == SessionType::Normal {
            let Some(tname) = get("TargetName").filter(|n| !n.is_empty()) else {
                return Err(LoginFailure::MissingParameter);
            };
            let Some(t) = self.setup.directory.target(tname) else {
                return Err(LoginFailure::NotFound);
            };
            if !t.permits(name) {
                return Err(LoginFailure::Authorization);
            }
            if let Some(addr) = &t.redirect {
                out.push((
                    "TargetAddress".into(),
                    format!("{addr},{}", t.portal_group_tag),
                ));
                return Err(LoginFailure::Redirected);
            }
            let t = t.clone();
            if let Some(alias) = &t.alias {
                out.push(("TargetAlias".into(), alias.clone()));
            }
            out.push((
                "TargetPortalGroupTag".into(),
                t.portal_group_tag.to_string(),
            ));
            self.target = Some(t);
        }
        Ok(())
    }

    /// The security stage: AuthMethod, then CHAP.
    fn security(&mut self, pairs: &[Pair], out: &mut Vec<Pair>) -> Result<(), LoginFailure> {
        use LoginFailure::Authentication as Auth_;
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(k2, _)| k2 == k)
                .map(|(_, v)| v.as_str())
        };
        let required = self.auth_required().cloned();
        if let Some(methods) = get("AuthMethod") {
            let offered: Vec<&str> = methods.split(',').collect();
            let pick = if required.is_some() {
                offered.iter().find(|m| **m == "CHAP")
            } else {
                offered.iter().find(|m| **m == "None")
            };
            match pick {
                Some(m) => {
                    out.push(("AuthMethod".into(), m.to_string()));
                    self.auth = if *m == "CHAP" {
                        Auth::ChapAgreed
                    } else {
                        Auth::NoneAgreed
                    };
                }
                None => {
                    out.push(("AuthMethod".into(), "Reject".into()));
                    return Err(Auth_);
                }
            }
        }
        if let Some(algs) = get("CHAP_A") {
            if self.auth != Auth::ChapAgreed {
                return Err(Auth_);
            }
            if !algs
                .split(',')
                .any(|a| text::parse_number(a) == Some(chap::ALGORITHM_MD5 as u64))
            {
                return Err(Auth_);
            }
            out.push(("CHAP_A".into(), chap::ALGORITHM_MD5.to_string()));
            out.push(("CHAP_I".into(), self.setup.chap_id.to_string()));
            out.push(("CHAP_C".into(), text::hex(&self.setup.chap_challenge)));
            self.auth = Auth::ChallengeSent;
        }
        let (n, r) = (get("CHAP_N"), get("CHAP_R"));
        if n.is_some() || r.is_some() {
            if self.auth != Auth::ChallengeSent {
                return Err(Auth_);
            }
            let (Some(n), Some(r), Some(creds)) = (n, r, required.as_ref()) else {
                return Err(Auth_);
            };
            let Some(r) = text::parse_binary(r) else {
                return Err(Auth_);
            };
            let want = chap::response(
                self.setup.chap_id,
                &creds.secret,
                &self.setup.chap_challenge,
            );
            if n != creds.user || !chap::responses_equal(&r, &want) {
                return Err(Auth_);
            }
            match (get("CHAP_I"), get("CHAP_C")) {
                (None, None) => {}
                (Some(i), Some(c)) => {
                    let id = text::parse_number(i).filter(|&i| i <= 255).ok_or(Auth_)? as u8;
                    let challenge = text::parse_binary(c).ok_or(Auth_)?;
                    // Refuse a reflected challenge (RFC 7143 §12.1.3) and absurd lengths.
                    if challenge == self.setup.chap_challenge
                        || challenge.is_empty()
                        || challenge.len() > 1024
                    {
                        return Err(Auth_);
                    }
                    let Some(m) = self.mutual_credentials() else {
                        return Err(Auth_);
                    };
                    if m.secret == creds.secret {
                        return Err(Auth_);
                    }
                    let resp = chap::response(id, &m.secret, &challenge);
                    out.push(("CHAP_N".into(), m.user.clone()));
                    out.push(("CHAP_R".into(), text::hex(&resp)));
                }
                _ => return Err(Auth_),
            }
            self.auth = Auth::Done;
        } else if get("CHAP_I").is_some() || get("CHAP_C").is_some() {
            return Err(Auth_);
        }
        Ok(())
    }
}
