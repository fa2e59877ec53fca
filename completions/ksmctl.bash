# bash completion for ksmctl, generated with click's shell completion
# (`_KSMCTL_COMPLETE=bash_source ksmctl`). It asks the installed ksmctl for
# candidates, so it follows whatever commands and options that ksmctl has.
_ksmctl_completion() {
    local IFS=$'\n'
    local response

    response=$(env COMP_WORDS="${COMP_WORDS[*]}" COMP_CWORD=$COMP_CWORD _KSMCTL_COMPLETE=bash_complete $1)

    for completion in $response; do
        IFS=',' read type value <<< "$completion"

        if [[ $type == 'dir' ]]; then
            COMPREPLY=()
            compopt -o dirnames
        elif [[ $type == 'file' ]]; then
            COMPREPLY=()
            compopt -o default
        elif [[ $type == 'plain' ]]; then
            COMPREPLY+=($value)
        fi
    done

    return 0
}

_ksmctl_completion_setup() {
    complete -o nosort -F _ksmctl_completion ksmctl
}

_ksmctl_completion_setup;
