// The QVD browser client (docs/protocol.md#browser-access).
//
// Log in: the password goes once, in a POST over TLS, to /qvd/web/login, which answers with
// the user's desktops and, for each one that can be opened, a short-lived single-use token
// bound to that desktop. The password is dropped at once; tokens live in this module's
// memory only (never localStorage, never the URL). Opening a desktop presents the token in
// the WebSocket's subprotocol list, where no access log or browser history keeps it, and
// hands the socket to noVNC, loaded from this node.
import RFB from "./novnc/core/rfb.js";

const $ = (id) => document.getElementById(id);
let desktops = [];      // [{id, name, state, blocked, token}]
let rfb = null;
let closeEvent = null;  // the WebSocket's close event: its reason says why a session ended

function setState(state, status) {
    document.body.dataset.state = state;
    $("status").textContent = status || "";
    $("login-view").hidden = state !== "login";
    $("vms-view").hidden = state !== "list";
    $("screen-view").hidden = !["connecting", "connected"].includes(state);
    $("disconnect").hidden = !["connecting", "connected"].includes(state);
}

function basicAuthorization(login, password) {
    const bytes = new TextEncoder().encode(`${login}:${password}`);
    let binary = "";
    for (const b of bytes) {
        binary += String.fromCharCode(b);
    }
    return "Basic " + btoa(binary);
}

async function logIn(event) {
    event.preventDefault();
    const login = $("login").value.trim();
    const passwordField = $("password");
    const authorization = basicAuthorization(login, passwordField.value);
    passwordField.value = "";
    $("login-error").textContent = "";
    $("login-button").disabled = true;
    try {
        const response = await fetch("/qvd/web/login", {
            method: "POST",
            headers: { Authorization: authorization },
            cache: "no-store",
            credentials: "omit",
        });
        if (!response.ok) {
            const text = (await response.text()).trim();
            $("login-error").textContent = response.status === 401 ? "Wrong user or password." : text;
            return;
        }
        const answer = await response.json();
        desktops = answer.vms;
        showDesktops(login);
    } catch (error) {
        $("login-error").textContent = `The server cannot be reached (${error.message}).`;
    } finally {
        $("login-button").disabled = false;
    }
}

function showDesktops(login) {
    const list = $("vms");
    list.replaceChildren();
    for (const vm of desktops) {
        const item = document.createElement("li");
        item.dataset.vmId = vm.id;
        const name = document.createElement("span");
        name.className = "name";
        name.textContent = vm.name;
        const state = document.createElement("span");
        state.className = "state";
        state.textContent = vm.blocked ? "blocked" : vm.state;
        const open = document.createElement("button");
        open.type = "button";
        open.className = "open";
        open.textContent = "Open";
        open.disabled = vm.blocked || !vm.token;
        open.addEventListener("click", () => openDesktop(vm));
        item.append(name, state, open);
        list.append(item);
    }
    if (desktops.length === 0) {
        const item = document.createElement("li");
        item.textContent = "You have no desktop.";
        list.append(item);
    }
    setState("list", `Logged in as ${login}`);
}

function openDesktop(vm) {
    const token = vm.token;
    vm.token = null;    // single use: the node spends it at the WebSocket handshake
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const url = `${scheme}://${location.host}/qvd/web/desktop?id=${encodeURIComponent(vm.id)}`;
    const socket = new WebSocket(url, ["binary", `qvd-token.${token}`]);
    closeEvent = null;
    socket.addEventListener("close", (event) => { closeEvent = event; });
    setState("connecting", `Connecting to ${vm.name}... (the desktop may take a moment to start)`);
    rfb = new RFB($("screen"), socket, { shared: true });
    rfb.scaleViewport = true;
    rfb.background = "#222";
    rfb.addEventListener("connect", () => {
        setState("connected", `Connected to ${vm.name}`);
        rfb.focus();
    });
    rfb.addEventListener("disconnect", (event) => ended(vm, event.detail.clean));
    rfb.addEventListener("securityfailure", (event) => {
        $("login-error").textContent = `The desktop refused the connection: ${event.detail.reason || event.detail.status}`;
    });
}

function ended(vm, clean) {
    rfb = null;
    $("screen").replaceChildren();
    desktops = [];
    let why = closeEvent && closeEvent.reason ? closeEvent.reason : (clean ? "closed" : "the connection was lost");
    $("login-error").textContent = `Session on ${vm.name} ended: ${why}. Log in again to reconnect.`;
    setState("login", "Disconnected");
    document.body.dataset.closeCode = closeEvent ? String(closeEvent.code) : "";
    $("login").focus();
}

function logOut() {
    desktops = [];
    $("vms").replaceChildren();
    setState("login", "");
}

$("login-form").addEventListener("submit", logIn);
$("logout").addEventListener("click", logOut);
$("disconnect").addEventListener("click", () => { if (rfb) rfb.disconnect(); });
setState("login", "");
